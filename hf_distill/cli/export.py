"""`hf-distill export`: write a saved student as one GGUF file (weights, tokenizer, chat template) for llama.cpp,
Ollama or transformers' GGUF loader.

hf-distill export --model runs/student --format gguf --quant q4_0 --output runs/student.gguf

Llama-family models only (SmolLM2, Llama 2/3, TinyLlama, ...); others get an error naming the supported ones. A
student trained with `student_quantization=int4w` (group size 32) exports to q4_0 without further rounding.
"""

import argparse


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from ..export import GGUF_QUANTS

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Folder of the saved model (save_pretrained) and its tokenizer.")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="Output format.")
    p.add_argument("--quant", default="f16", choices=list(GGUF_QUANTS), help="Weight type of the 2-D tensors.")
    p.add_argument("--output", required=True, help="Path of the file to write, e.g. model.gguf.")
    p.add_argument("--tokenizer", default=None, help="Tokenizer folder when it is not --model.")
    p.add_argument("--name", default=None, help="general.name stored in the file (default: the folder name).")
    return p


def run(argv: list[str], prog: str = "hf-distill export") -> None:
    opts = make_parser(prog).parse_args(argv)
    from ..export import export_gguf

    result = export_gguf(opts.model, opts.output, quant=opts.quant, tokenizer_dir=opts.tokenizer, name=opts.name)
    counts: dict[str, int] = {}
    for kind in result["tensors"].values():
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"Wrote {result['path']} ({result['bytes'] / 1e6:.1f} MB; tensors: {summary}).")
