"""A local page: type a prompt and watch the image fill in row by row, drop in a picture and ask about it.

    pip install torch==2.13.0 -e ".[demo]"          # Gradio, an optional extra
    python demo.py --ckpt out/tiny                  # any train_tiny.py run; then open http://127.0.0.1:7860
    python demo.py --ckpt out/tiny --pace 0.2       # hold every finished row 0.2 s, to watch a tiny model draw
    python demo.py --ckpt out/video                 # a --video run: Ask also takes clips (animated GIFs)
    python demo.py --weights BAAI/Emu3-Gen --vq BAAI/Emu3-VisionTokenizer --device cuda   # released weights
    python demo.py --weights BAAI/Emu3-Chat --vq BAAI/Emu3-VisionTokenizer --device cuda  # (Ask)
    python demo.py --chameleon Anole-7b-v0.1-hf --device cuda
    python demo.py --llamagen c2i_B_256.pt --vq vq_ds16_c2i.pt                            # class -> image

One process, the model loaded once (nano_emu/demo.py: every draw and answer holds one lock, so two tabs cannot
write into each other's KV cache). The page binds 127.0.0.1 unless --host says otherwise.
"""

import importlib.util
import os

from nano_emu import cli
from nano_emu.demo import CSS, Demo, build_page, model_facts, run_facts, theme


class MissingGradio(RuntimeError):
    pass


def title_of(args) -> str:
    if args.ckpt:
        return f"tiny run {args.ckpt}"
    if args.llamagen:
        return f"LlamaGen {args.llamagen}"
    return f"Chameleon {args.chameleon}" if args.chameleon else f"Emu3 {args.weights}"


def main(args):
    if importlib.util.find_spec("gradio") is None:   # before the model loads: that may take minutes
        raise MissingGradio('the demo page needs Gradio, an optional extra: pip install -e ".[demo]"')
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # a local page phones nobody
    pipe = cli.load_pipeline(args)
    pipe.compile = args.compile
    facts = run_facts(args.ckpt) if args.ckpt else ""
    demo = Demo(pipe, facts=facts + "\n\n" + model_facts(pipe), pace=args.pace)
    page = build_page(demo, title_of(args))
    page.queue().launch(server_name=args.host, server_port=args.port, theme=theme(), css=CSS, ssr_mode=False)


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__)
    source = p.add_argument_group("model (one of; as sample.py takes them)")
    source.add_argument("--ckpt", type=cli.existing_folder,
                        help="a train_tiny.py output folder (vq.safetensors + gpt.safetensors)")
    source.add_argument("--weights", type=cli.hub_folder, help="released Emu3 folder or Hub id: Emu3-Gen / Emu3-Chat")
    source.add_argument("--vq", type=cli.hub_path, help="Emu3-VisionTokenizer folder (not needed for -hf "
                        "folders); with --llamagen, its VQ file")
    source.add_argument("--chameleon", type=cli.hub_folder, help="a Chameleon or Anole folder or Hub id")
    source.add_argument("--tokenizer-dir", type=cli.existing_folder, default=None,
                        help="with --chameleon's original layout: its tokenizer/ folder")
    source.add_argument("--llamagen", type=cli.hub_file, help="a released LlamaGen c2i GPT checkpoint "
                        "(c2i_B_256.pt, ...); --vq is then its VQ (vq_ds16_c2i.pt)")
    source.add_argument("--gpt-model", default=None, help="with --llamagen: GPT-B ... GPT-3B (default: from the "
                        "checkpoint's shapes)")
    source.add_argument("--image-size", type=cli.at_least(1), default=None,
                        help="with --llamagen: 256 or 384 (default: from the file name); --chameleon: 512")
    page = p.add_argument_group("the page")
    page.add_argument("--host", default="127.0.0.1",
                      help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    page.add_argument("--port", type=cli.checked(int, lambda n: 0 < n < 65536, "a TCP port, 1-65535"),
                      default=7860)
    page.add_argument("--pace", type=cli.checked(float, lambda s: 0 <= s <= 10, "in [0, 10] seconds"), default=0.0,
                      help="hold every finished row at least this many seconds (a tiny model draws faster than "
                           "the eye follows; default 0)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (same images, faster after "
                   "the first, which pays the compile)")
    p.add_argument("--device", type=cli.device, default="auto", help="auto | cpu | cuda[:N] | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="GPT weights and activations (auto: float32 for --ckpt and --llamagen, bfloat16 for "
                        "--weights and --chameleon)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if sum(map(bool, (args.ckpt, args.weights, args.chameleon, args.llamagen))) != 1:
        p.error("give one of --ckpt (a train_tiny.py output folder), --weights (released Emu3 weights), "
                "--chameleon (a Chameleon / Anole folder) or --llamagen (with --vq)")
    if args.llamagen and not args.vq:
        p.error("--llamagen needs --vq (its VQ, e.g. vq_ds16_c2i.pt)")
    if args.vq and not (args.weights or args.llamagen):
        p.error("--vq goes with --weights or --llamagen")
    if args.tokenizer_dir and not args.chameleon:
        p.error("--tokenizer-dir goes with --chameleon (its original layout)")
    if args.gpt_model and not args.llamagen:
        p.error("--gpt-model goes with --llamagen")
    if args.image_size and not (args.llamagen or args.chameleon):
        p.error("--image-size goes with --llamagen or --chameleon")
    return args


# what the user can fix, shown as one line and exit 2: no Gradio; a checkpoint folder that lacks a file or holds a
# corrupt one (ValueError); a port already taken, a full disk (OSError). Any other error is a bug: its traceback.
USER_INPUT_ERRORS = (MissingGradio, OSError, ValueError)

if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except USER_INPUT_ERRORS as e:
        build_parser().error(str(e))
