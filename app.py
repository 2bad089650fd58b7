"""SEED-Story in the browser: ``python app.py [--preset NAME]`` serves on http://127.0.0.1:7860.

Thin wiring only: every action calls ``seedstory.app_logic``; the models are loaded once in a
``ModelHolder`` and shared by all browser sessions, each of which has its own stories.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys

from seedstory.space import gpu, serve_options, wants_download  # noqa: E402 - light: imports no library

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
if not wants_download(sys.argv[1:]):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time unless asked

from seedstory.quiet import quiet_libraries  # noqa: E402
from seedstory.threads import passive_openmp  # noqa: E402

passive_openmp()
quiet_libraries()

import gradio as gr  # noqa: E402

from seedstory import app_logic as logic  # noqa: E402
from seedstory.atomic import write_file  # noqa: E402
from seedstory.config import CONTEXT_SOURCES, MAX_CAPTION_CANDIDATES, REPETITION_SCOPES, list_presets  # noqa: E402
from seedstory.holder import ModelHolder  # noqa: E402

USER_ERRORS = (ValueError, FileNotFoundError, OSError)  # StoryError, ImageError, PresetError, CheckpointError...


def hand_upload_to_app(component: gr.Image) -> gr.Image:
    """Let an image upload reach the app's own loader untouched: gr.Image opens every upload with PIL first, so an
    empty file, a non-image or a decompression bomb raised Gradio's raw error, naming the server's temporary
    path, before the app's messages could run. (An instance override: a gr.Image subclass would make Gradio
    write a stub file next to this one.)"""
    own = component.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return own(payload)

    component.preprocess = preprocess
    return component


# The model paints small pictures: shown whole, filling their box, scaled up without blurring.
APP_CSS = """
#selected-frame img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#storyboard img, #versions img { image-rendering: pixelated; }
#storyboard .caption-label, #versions .caption-label { white-space: normal; overflow: visible; text-overflow: clip;
  max-height: none; }
"""


def build_app(holder: ModelHolder, allow_model_switch: bool = False) -> gr.Blocks:
    """The app over the shared models in ``holder``. Which model runs is the operator's choice: visitors can
    switch it only when ``allow_model_switch`` (a private machine), never on a public server by default."""
    def picture(session, frame):
        """The frame's picture as a PNG written once. Gradio re-saves a PIL image into its cache on every render,
        in place, so a browser or client fetching it meanwhile could get a truncated file (two sessions showing
        the same picture, or a storyboard re-rendered while it loads); a path is copied into the cache once,
        atomically."""
        if frame is None or frame.image is None:
            return None
        path = os.path.join(session.workdir, f"frame-{session.tree.uid}-{frame.id}.png")
        if not os.path.exists(path):
            write_file(path, lambda f: frame.image.save(f, format="PNG"))
        return path

    def render(session, message="", changed=True):
        if changed:
            logic.autosave(session)  # so a page reload finds the story again
        tree = session.tree
        current = tree.get(tree.current) if tree is not None and tree.current is not None else None
        choices = logic.frame_choices(session)
        shown = tree.path(tree.leaf(current.id)) if current is not None else []
        board = [(picture(session, f) or image, caption) for f, (image, caption) in zip(shown, logic.storyboard(session))]
        sibs = [(picture(session, f) or logic.painting_placeholder(tree), caption)
                for f, caption in logic.versions(session)]
        return (
            session,
            board,
            picture(session, current),
            current.text if current is not None else "",
            logic.frame_info(session),
            gr.update(choices=choices, value=logic.frame_label(current) if current is not None else None),
            logic.tree_html(session),
            message,
            sibs,
        )

    def guarded(fn):
        """Turn a person's mistake into a message in the UI; the story stays as it was."""
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except USER_ERRORS as e:
                    raise gr.Error(str(e), print_exception=False) from None
            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as e:
                raise gr.Error(str(e), print_exception=False) from None
        return wrapper

    def new_session(session):
        return session if isinstance(session, logic.StorySession) else logic.StorySession()

    def resume(session, key):
        session = new_session(session)
        key, message = logic.resume(session, holder, key)
        return (key, *render(session, message, changed=False))

    @gpu()
    @guarded
    def start_story(session, ui, image, text, progress=gr.Progress()):
        session = new_session(session)
        progress(0.1, desc="reading the picture")
        tree = logic.start_story(session, holder, image, text, ui)
        note = logic.familiarity_note(holder, tree.get(tree.current).features)  # the opening, already encoded
        return render(session, "Story started. Press **Next frame** to continue it." + (f"\n\n{note}" if note else ""))

    @gpu(frames=lambda session, ui, n=1, *rest, **kw: int(n or 1))
    @guarded
    def next_frame(session, ui, n=1, progress=gr.Progress()):
        session = new_session(session)
        done = 0
        for frame in logic.next_frames(session, holder, n, ui, progress=lambda stage, f: progress(f, desc=stage),
                                       as_written=True):
            if frame.image is None:  # its text is written; the picture follows
                yield render(session, f"Frame #{frame.id} written; painting it…")
                continue
            done += 1
            yield render(session, f"Frame {done} of {int(n)} done: #{frame.id}.")
        stopped = " (stopped)" if done < int(n) else ""
        yield render(session, f"Added {done} frame(s){stopped}.")

    def stop_story(session):
        if isinstance(session, logic.StorySession):
            logic.stop(session)
        return "Stopping after the frame in progress…"

    @gpu()
    @guarded
    def regenerate_frame(session, ui, frame, part, seed):
        session = new_session(session)
        # The seed box shows 0 when empty (Gradio's Number), so 0 means "a new seed", as the label says.
        f = logic.regenerate(session, holder, frame, part, seed or None, ui)
        made = {"image": f"a new picture (seed {f.seed})",
                "text": f"new text{f' (seed {int(seed)})' if seed else ''}, its picture painted with the frame's seed "
                        f"{f.seed}",
                "both": f"new text and picture (seed {f.seed})"}[part]
        return render(session, f"Regenerated as frame #{f.id}: {made}.")

    @gpu()
    @guarded
    def edit_frame(session, ui, frame, text):
        session = new_session(session)
        f = logic.edit(session, holder, frame, text, ui)
        return render(session, f"Edited: new frame #{f.id}. Press **Next frame** to continue from it.")

    @gpu()
    @guarded
    def branch_story(session, ui, frame, text):
        session = new_session(session)
        f = logic.branch(session, holder, frame, text, ui)
        return render(session, f"New branch at frame #{f.id}.")

    @guarded
    def select_frame(session, frame):
        session = new_session(session)
        logic.select(session, frame)
        return render(session)

    @guarded
    def select_from_storyboard(session, evt: gr.SelectData):
        session = new_session(session)
        logic.select_on_storyboard(session, evt.index)
        return render(session)

    @guarded
    def select_version(session, evt: gr.SelectData):
        session = new_session(session)
        logic.select_version(session, evt.index)
        return render(session)

    @guarded
    def read_branch(session):
        return logic.reading_html(new_session(session))

    @guarded
    def select_in_tree(session, evt: gr.EventData):
        session = new_session(session)
        data = evt._data if isinstance(evt._data, dict) else {}
        logic.select(session, data.get("frame"))  # checked there: a page can send anything
        return render(session)

    @guarded
    def sibling(session, delta):
        session = new_session(session)
        logic.switch_sibling(session, delta)
        return render(session)

    @guarded
    def delete_frame(session, ui, frame):
        session = new_session(session)
        logic.delete(session, holder, frame, ui)
        n = len(session.deleted.frames)
        return render(session, f"Deleted {n} frame(s). **Undo delete** puts them back.")

    @guarded
    def undo_delete(session):
        session = new_session(session)
        top = logic.undo_delete(session)
        return render(session, f"Put back frame #{top.id} and what follows it.")

    @guarded
    def export_story(session, fmt):
        return logic.export(new_session(session), fmt)

    @guarded
    def save_session(session):
        return logic.save(new_session(session))

    @guarded
    def load_session(session, file):
        session = new_session(session)
        logic.load(session, file, holder)
        return render(session, "Story loaded.")

    def load_model(preset):
        return logic.load_preset(holder, preset)

    def model_status():
        return logic.model_report(holder)

    # Gradio's copies of uploads and outputs older than an hour are deleted every hour.
    with gr.Blocks(title="SEED-Story", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        session = gr.State(None, delete_callback=lambda s: logic.close_session(s, holder))  # a visitor has gone
        ui = gr.State(logic.UISettings())
        browser_key = gr.BrowserState(None, storage_key="seedstory-story",  # finds the story after a reload
                                      secret=logic.browser_secret())
        gr.Markdown("# SEED-Story\nUpload an opening picture, write the first lines, and let the model continue the "
                    "story frame by frame. Select any frame to regenerate it, edit its text or branch the story.")
        with gr.Row():
            with gr.Column(scale=1):
                image_in = hand_upload_to_app(gr.Image(type="filepath", image_mode=None, label="Opening picture",
                                                       sources=["upload", "clipboard"], height=256))
                picture_note = gr.Markdown()
                text_in = gr.Textbox(label="Opening text", lines=3, placeholder="Once upon a time…")
                start_btn = gr.Button("Start story", variant="primary")
                gr.Examples(logic.examples(holder.preset), [image_in, text_in], label="Examples")
            with gr.Column(scale=2):
                board = gr.Gallery(label="Storyboard (the current branch)", columns=4, height=420,
                                   allow_preview=False, object_fit="contain", elem_id="storyboard")
                with gr.Row():
                    next_btn = gr.Button("Next frame", variant="primary")
                    n_frames = gr.Slider(1, logic.MAX_FRAMES_PER_CLICK, value=4, step=1, label="N")
                    next_n_btn = gr.Button("Next N frames")
                    stop_btn = gr.Button("Stop", variant="stop")
                status = gr.Markdown(label="Status")
                with gr.Accordion("Reading view: the current branch, whole pictures and full text", open=False):
                    read_btn = gr.Button("Show the current branch")
                    reading = gr.HTML(label="Reading view")
        with gr.Row():
            with gr.Column(scale=1):
                frame_sel = gr.Dropdown(label="Frame", choices=[], interactive=True, allow_custom_value=True)
                with gr.Row():
                    prev_btn = gr.Button("◀ other version")
                    next_sib_btn = gr.Button("other version ▶")
                frame_img = gr.Image(label="Selected frame", interactive=False, height=300, elem_id="selected-frame")
                frame_info = gr.Markdown(label="Frame details")
                versions = gr.Gallery(label="Versions of this frame (click one to show it)", columns=3, height=220,
                                      allow_preview=False, object_fit="contain", elem_id="versions")
            with gr.Column(scale=1):
                frame_text = gr.Textbox(label="Frame text (edit, then apply)", lines=4)
                edit_btn = gr.Button("Apply edit (new version of this frame)")
                with gr.Row():
                    part = gr.Radio(logic.PART_CHOICES, value="both", label="Regenerate")
                    regen_seed = gr.Number(label="Seed (0: a new one)", precision=0, value=None)
                regen_btn = gr.Button("Regenerate this frame")
                branch_text = gr.Textbox(label="Branch here with this text (empty: let the model write)", lines=2)
                branch_btn = gr.Button("Branch here")
                with gr.Row():
                    delete_btn = gr.Button("Delete this frame and what follows", variant="stop")
                    undo_btn = gr.Button("Undo delete")
            with gr.Column(scale=1):
                gr.Markdown("### Story tree")
                tree_view = gr.HTML(logic.NO_STORY_HTML, label="Story tree", css_template=logic.TREE_CSS,
                                    js_on_load=logic.TREE_JS, elem_id="story-tree")
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                preset = gr.Dropdown(list_presets(), value=holder.preset, label="Model preset",
                                     visible=allow_model_switch)
                load_btn = gr.Button("Load model", visible=allow_model_switch)
                model_info = gr.Markdown()
            with gr.Row():
                decoding = gr.Radio(list(logic.DECODINGS), value="preset",
                                    label="Text decoding (preset: the model's own default)")
                temperature = gr.Slider(0.1, 2.0, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                repetition = gr.Slider(0.0, 2.0, value=0.0, step=0.05,
                                       label="Repetition penalty (1: off, 0: preset default)")
                scope = gr.Dropdown(list(REPETITION_SCOPES), value=None,
                                    label="The penalty counts repeated (empty: preset default)")
                no_repeat = gr.Number(label="Redraw a caption that repeats one of the last N (0: preset default, "
                                            "-1: off)", precision=0, value=0, minimum=-1, maximum=100)
                caption_candidates = gr.Slider(0, MAX_CAPTION_CANDIDATES, value=0, step=1,
                                               label="Captions drawn per frame when sampling, the likeliest new one "
                                                     "kept (0: preset default)")
                seed = gr.Number(label="Seed (0: preset default)", precision=0, value=None)
            with gr.Row():
                steps = gr.Slider(0, 100, value=0, step=1, label="Image steps (0: preset default)")
                guidance = gr.Slider(0.0, 15.0, value=0.0, step=0.5, label="Guidance (0: preset default)")
                scheduler = gr.Dropdown(logic.SCHEDULERS, value=None, label="Scheduler (empty: preset default)")
                candidates = gr.Slider(0, 8, value=0, step=1,
                                       label="Pictures painted per frame, the closest to the agent's features kept "
                                             "(0: preset default)")
            with gr.Row():
                mode = gr.Radio(logic.CONTEXT_MODES, value="window", label="Context")
                window = gr.Slider(0, 16, value=0, step=1, label="Frames kept in context (0: preset default)")
                context_from = gr.Dropdown(list(CONTEXT_SOURCES), value=None,
                                           label="A new frame enters the context as the agent's features or its "
                                                 "painted picture read back (empty: preset default)")
        with gr.Accordion("Save, load, export", open=False):
            with gr.Row():
                fmt = gr.Radio(list(logic.FORMATS), value="comic", label="Export format")
                export_btn = gr.Button("Export the current branch")
                save_btn = gr.Button("Save session")
            with gr.Row():
                out_file = gr.File(label="Download")
                load_file = gr.File(label="Load a saved session (.zip)", file_types=[".zip"], type="filepath")
                load_story_btn = gr.Button("Load session")

        # UISettings field -> its widget; /configure takes the values in this order (0 or empty: the preset's)
        fields = dict(decoding=decoding, temperature=temperature, top_p=top_p, steps=steps, guidance=guidance,
                      scheduler=scheduler, mode=mode, window=window, seed=seed, repetition_penalty=repetition,
                      no_repeat_captions=no_repeat, repetition_scope=scope, candidates=candidates,
                      context_from=context_from, caption_candidates=caption_candidates)
        settings = list(fields.values())

        def configure(*values):
            return logic.UISettings(**dict(zip(fields, values)))

        view = [session, board, frame_img, frame_text, frame_info, frame_sel, tree_view, status, versions]
        for widget in settings:
            widget.change(configure, settings, [ui], api_name=False)
        configure_btn = gr.Button(visible=False)
        configure_btn.click(configure, settings, [ui], api_name="configure")

        image_in.change(gpu()(lambda image: logic.picture_note(holder, image)), [image_in], [picture_note],
                        api_name=False)
        # Progress and errors show on the status line only: an error must not look as if the story were gone.
        on_status = dict(show_progress_on=[status])
        start_btn.click(start_story, [session, ui, image_in, text_in], view, api_name="start_story", **on_status)
        next_btn.click(next_frame, [session, ui], view, api_name="next_frame", **on_status)
        next_n_btn.click(next_frame, [session, ui, n_frames], view, api_name="next_frames", **on_status)
        stop_btn.click(stop_story, [session], [status], api_name="stop", concurrency_limit=None, queue=False)
        regen_btn.click(regenerate_frame, [session, ui, frame_sel, part, regen_seed], view, api_name="regenerate_frame",
                        **on_status)
        edit_btn.click(edit_frame, [session, ui, frame_sel, frame_text], view, api_name="edit_frame", **on_status)
        branch_btn.click(branch_story, [session, ui, frame_sel, branch_text], view, api_name="branch_story",
                         **on_status)
        frame_sel.input(select_frame, [session, frame_sel], view, api_name="select_frame", **on_status)
        board.select(select_from_storyboard, [session], view, api_name=False, **on_status)
        tree_view.click(select_in_tree, [session], view, api_name=False, **on_status)
        versions.select(select_version, [session], view, api_name=False, **on_status)
        read_btn.click(read_branch, [session], [reading], api_name="read_branch")
        prev_btn.click(lambda s: sibling(s, -1), [session], view, api_name="previous_version", **on_status)
        next_sib_btn.click(lambda s: sibling(s, 1), [session], view, api_name="next_version", **on_status)
        delete_btn.click(delete_frame, [session, ui, frame_sel], view, api_name="delete_frame", **on_status)
        undo_btn.click(undo_delete, [session], view, api_name="undo_delete", **on_status)
        export_btn.click(export_story, [session, fmt], [out_file], api_name="export_story")
        save_btn.click(save_session, [session], [out_file], api_name="save_session")
        load_story_btn.click(load_session, [session, load_file], view, api_name="load_session", **on_status)
        if allow_model_switch:
            load_btn.click(load_model, [preset], [model_info], api_name="load_model", concurrency_limit=1)
        demo.load(model_status, None, [model_info], api_name=False)
        # While the weights are fetched, the first screen shows how far along; the timer stops once they are in.
        fetch_timer = gr.Timer(2.0, active=holder.fetching is not None)
        fetch_timer.tick(lambda: (model_status(), gr.Timer(active=holder.fetching is not None)), None,
                         [model_info, fetch_timer], api_name=False, show_progress="hidden")
        demo.load(resume, [session, browser_key], [browser_key, *view], api_name=False, **on_status)
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="SEED-Story web app")
    parser.add_argument("--preset",
                        help=f"model preset ({', '.join(list_presets())}); default: $SEEDSTORY_PRESET, else the demo")
    parser.add_argument("--allow-model-switch", action="store_true",
                        default=os.environ.get("SEEDSTORY_ALLOW_MODEL_SWITCH", "") not in ("", "0"),
                        help="let visitors load another model for everyone (a private machine only; "
                             "$SEEDSTORY_ALLOW_MODEL_SWITCH=1)")
    parser.add_argument("--concurrency", type=int, default=1, help="model calls at a time")
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting at most")
    parser.add_argument("--download", action="store_true",
                        help="fetch the release preset's missing files from the Hugging Face Hub first (the app shows "
                             "the progress); $SEEDSTORY_DOWNLOAD=1 on a Space")
    args = parser.parse_args(argv)
    opts = serve_options(args.preset, args.download)
    holder = ModelHolder(opts.preset, opts.overrides)
    logic.prune_autosaves()
    if opts.download:
        holder.fetch_in_background()
    else:
        try:
            holder.pipeline()  # load at start so the first visitor does not wait; errors show in the UI too
        except Exception as e:  # noqa: BLE001 - the app still opens and says what is wrong
            print(f"warning: could not load preset {holder.preset!r}: {e}")
    demo = build_app(holder, allow_model_switch=args.allow_model_switch)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        share=False,
        max_file_size="20mb",
        css=APP_CSS,
        show_error=True,
        quiet=True,  # Gradio's own banner suggests a share link, which this app does not make
        prevent_thread_lock=True,
    )
    print(f"SEED-Story ({holder.preset}) is running: open {demo.local_url} in a browser. Ctrl+C stops it.", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
