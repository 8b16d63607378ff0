"""``minigpt web MODEL``: a Gradio chat UI (image, chat, decoding sliders, reset).

It binds to 127.0.0.1 unless ``--host`` says otherwise; a public gradio.live link needs ``--share``.
Each browser session has its own :class:`Chat`; all share one :class:`ChatEngine`. API names
(for ``gradio_client``): ``/set_image``, ``/ask``, ``/reset``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .args import add_generation_arguments, add_model_arguments

if TYPE_CHECKING:
    import gradio as gr

    from .chat import Chat, ChatEngine

TITLE = "MiniGPT"


def _messages(chat: Chat, pending: tuple[str, str] | None = None) -> list[dict[str, str]]:
    """The chat history (plus a question being answered) as Chatbot messages."""
    pairs = [(ex.question, ex.answer) for ex in chat.history] + ([pending] if pending else [])
    return [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def build_ui(engine: ChatEngine) -> gr.Blocks:
    """The Blocks app for ``engine`` (not launched)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    from .generate import OptionOverrides

    defaults = engine.options

    def session(chat: Chat | None) -> Chat:
        return chat if chat is not None else engine.chat()

    def set_image(path: str | None, chat: Chat | None) -> Chat:
        chat = session(chat)
        try:
            chat.set_images(*([path] if path else []))
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return chat

    def ask(
        question: str, temperature: float, top_p: float, beams: float, max_tokens: float, chat: Chat | None
    ) -> Iterator[tuple[list[dict[str, str]], str, Chat]]:
        chat = session(chat)
        question = (question or "").strip()
        if not question:
            yield _messages(chat), "", chat
            return
        try:
            overrides = OptionOverrides(
                temperature=temperature, top_p=top_p, num_beams=int(beams), max_new_tokens=int(max_tokens)
            )
            options = overrides.apply(defaults)
            answer = ""
            yield _messages(chat, (question, answer)), "", chat
            for delta in chat.stream(question, options):
                answer += delta
                yield _messages(chat, (question, answer)), "", chat
        except ValueError as err:
            raise gr.Error(str(err)) from None
        yield _messages(chat), "", chat

    def reset(chat: Chat | None) -> tuple[None, list[Any], Chat]:
        chat = session(chat)
        chat.reset(images=True)
        return None, [], chat

    with gr.Blocks(title=TITLE) as demo:
        state = gr.State(None)
        gr.Markdown(f"## {TITLE}: {engine.name}\nUpload an image, then ask about it.")
        with gr.Row():
            with gr.Column(scale=1):
                # image_mode=None: Gradio hands over the file as uploaded, undecoded (it would convert it to RGB,
                # decoding a pixel bomb before the pixel limit is checked, and apply EXIF rotation)
                image = gr.Image(
                    type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"], height=260
                )
                temperature = gr.Slider(
                    0,
                    2,
                    value=defaults.temperature if defaults.do_sample else 0,
                    step=0.05,
                    label="Temperature (0 = greedy)",
                )
                top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p")
                beams = gr.Slider(1, 5, value=defaults.num_beams, step=1, label="Beams")
                max_tokens = gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1, label="Max new tokens")
                reset_button = gr.Button("Reset")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", height=460)
                question = gr.Textbox(label="Question", placeholder="Ask about the image and press Enter")
                send = gr.Button("Send", variant="primary")
        image.change(set_image, [image, state], [state], api_name="set_image")
        inputs = [question, temperature, top_p, beams, max_tokens, state]
        send.click(ask, inputs, [chatbot, question, state], api_name="ask")
        question.submit(ask, inputs, [chatbot, question, state], api_visibility="private")
        reset_button.click(reset, [state], [image, chatbot, state], api_name="reset")
    return demo


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "web",
        help="Gradio web chat",
        description="A Gradio chat UI for a model (binds to 127.0.0.1).",
    )
    add_model_arguments(parser)
    add_generation_arguments(parser)
    g = parser.add_argument_group("web")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--share", action="store_true", help="also open a public gradio.live link (explicit opt-in)")
    g.add_argument("--queue-size", type=int, default=16, help="waiting requests before the UI refuses more")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .args import engine_from_args

    engine = engine_from_args(args)
    if engine.max_image_pixels is not None:  # Gradio opens uploads with Pillow first; our limit refuses them after
        import warnings

        from PIL.Image import DecompressionBombWarning

        warnings.filterwarnings("ignore", category=DecompressionBombWarning)
    demo = build_ui(engine)
    demo.queue(max_size=args.queue_size)
    # quiet: Gradio's own lines advise `share=True` in `launch()`; ours names the flag
    _, local_url, share_url = demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, quiet=True, prevent_thread_lock=True
    )
    print(f"minigpt web: running on {local_url}", flush=True)
    if share_url:
        print(f"minigpt web: public link {share_url} (temporary; anyone with it can use the model)", flush=True)
    elif args.share:
        print("minigpt web: no public link could be made (see the message above)", flush=True)
    else:
        print("minigpt web: for a public gradio.live link, run again with --share", flush=True)
    demo.block_thread()
    return 0
