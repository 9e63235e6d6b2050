"""Stream DFlash generation from Python, with the demo pair shipped in the package.

python examples/generate.py
"""

from dflash_mlx import demo, load, load_draft, stream_generate

model, tokenizer = load(str(demo.TARGET))
draft = load_draft(demo.DRAFT)

prompt = "    def __repr__(self):\n"
print(prompt, end="")
for response in stream_generate(model, draft, tokenizer, prompt, max_tokens=128):
    print(response.text, end="", flush=True)
print(
    f"\n\n{response.generation_tps:.1f} tokens/s, "
    f"{response.acceptance_length:.2f} tokens per target forward (tau)"
)
