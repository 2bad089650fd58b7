"""Evaluation: ``python -m seedstory.eval <command>``.

    judge      score saved stories with an LLM judge (any OpenAI-compatible chat endpoint), or compare
               two folders of stories pairwise
    generate   make stories from the first frame of each validation story (the paper's protocol)

Library use::

    from seedstory.eval import ChatClient, judge_stories
    client = ChatClient("http://127.0.0.1:8000/v1", "my-vlm", api_key=None)
    summary, report = judge_stories(client, "stories/", "stories-judge/")
"""
from .client import ChatClient, ChatError
from .judge import ASPECTS, judge_pairwise, judge_stories, parse_preference, parse_score

__all__ = ["ASPECTS", "ChatClient", "ChatError", "judge_pairwise", "judge_stories", "parse_preference", "parse_score"]
