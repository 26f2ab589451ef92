"""Export any loadable model as a Hugging Face folder or a GGUF file.

    python -m ptjax.export --model=runs/smollm_lora --out=exports/smollm_hf
    python -m ptjax.export --model=model.gguf --adapter=runs/x/adapter --out=x.gguf --dtype=Q8_0

`--model` is anything `ptjax.interop.load` reads (GGUF file, Hugging Face folder, ptjax run);
`--adapter` merges a PEFT LoRA/DoRA/IA3 folder first. An `--out` ending in `.gguf` writes GGUF
(F16 or Q8_0 with the tokenizer and chat template); anything else a Hugging Face folder with
tokenizer files and generation_config.json (see `ptjax.interop.export`).
"""

from absl import app, flags

from ptjax.interop import export, load

_MODEL = flags.DEFINE_string("model", None, "GGUF file, Hugging Face folder or ptjax run directory.")
_ADAPTER = flags.DEFINE_string("adapter", "", "PEFT adapter folder to merge first.")
_OUT = flags.DEFINE_string("out", None, "Output: a folder (Hugging Face) or a path ending in .gguf.")
_DTYPE = flags.DEFINE_string("dtype", "", f"folder: one of {export.HF_DTYPES} (default float32); "
                             f"GGUF: one of {export.GGUF_DTYPES} (default Q8_0).")
flags.mark_flags_as_required(["model", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    pretrained = load.load(_MODEL.value, adapter=_ADAPTER.value)
    if "prompt" in pretrained.params or "prefix" in pretrained.params:
        raise app.UsageError("soft prompts cannot be merged into weights; the adapter folder "
                             "is already in PEFT's format")
    out = _OUT.value
    if out.endswith(".gguf"):
        dtype = _DTYPE.value or "Q8_0"
        if dtype not in export.GGUF_DTYPES:
            raise app.UsageError(f"--dtype for GGUF must be one of {export.GGUF_DTYPES}, got {dtype!r}")
        export.save_gguf(pretrained.params, pretrained.config, pretrained.tokenizer, out, dtype=dtype)
    else:
        dtype = _DTYPE.value or "float32"
        if dtype not in export.HF_DTYPES:
            raise app.UsageError(f"--dtype for a folder must be one of {export.HF_DTYPES}, got {dtype!r}")
        export.save_hf(pretrained.params, pretrained.config, pretrained.tokenizer, out,
                       generation=pretrained.generation, dtype=dtype)
    print(out)


if __name__ == "__main__":
    app.run(main)
