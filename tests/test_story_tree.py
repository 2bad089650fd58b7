import pytest

from seedstory.story import Frame, StoryError, StoryTree


def build():
    t = StoryTree()
    t.add(Frame(0, None, "root"))
    t.add(Frame(1, 0, "a"))
    t.add(Frame(2, 1, "b"))
    t.add(Frame(3, 1, "b'"))
    t.add(Frame(4, 3, "c"))
    return t


def test_paths_siblings_leaf():
    t = build()
    assert [f.id for f in t.path(4)] == [0, 1, 3, 4]
    assert t.siblings(2) == [2, 3] and t.siblings(0) == [0]
    assert t.leaf(1) == 4 and t.leaf(2) == 2
    assert t.current == 4 and [f.id for f in t.path()] == [0, 1, 3, 4]
    assert t.new_id() == 5


def test_delete_subtree_moves_current_and_keeps_others():
    t = build()
    assert sorted(t.delete(3)) == [3, 4]
    assert 3 not in t and 4 not in t and t.get(1).children == [2]
    assert t.current == 1
    assert [f.id for f in t.path(2)] == [0, 1, 2]
    with pytest.raises(StoryError, match="no frame 4"):
        t.get(4)


def test_invariants_parent_child_links():
    t = build()
    for f in t.frames.values():
        for c in f.children:
            assert t.get(c).parent == f.id
        if f.parent is None:
            assert f.id in t.roots
    with pytest.raises(StoryError):
        t.add(Frame(2, 0, "dup"))
