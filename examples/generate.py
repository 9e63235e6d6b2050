"""Stream DFlash generation from Python, with the demo pair shipped in examples/demo.

python examples/generate.py
"""

from pathlib import Path

from dflash_mlx import load, load_draft, stream_generate

DEMO = Path(__file__).parent / "demo"

model, tokenizer = load(str(DEMO / "target"))
draft = load_draft(DEMO / "draft")

prompt = "    def __repr__(self):\n"
print(prompt, end="")
for response in stream_generate(model, draft, tokenizer, prompt, max_tokens=128):
    print(response.text, end="", flush=True)
print(
    f"\n\n{response.generation_tps:.1f} tokens/s, "
    f"{response.acceptance_length:.2f} tokens per target forward (tau)"
)
