"""Looking at the selection: `megaslm analyze tokens`, `megaslm analyze dynamics`, and the training-time token view.

- `scoring`: load a model (Hugging Face directory or run directory), check that two models share a tokenizer,
  per-token losses of token windows with the training loss head (`TokenLossModel` / `per_token_ce`).
- `documents`: the analyzed text: documents from shards or text files, and windows over them.
- `tokens`: per-token losses of a model and a reference, Rho-1 selection, tokens.jsonl and tokens.html.
- `dynamics`: one held-out sample scored by every checkpoint of a run; H->H / L->H / H->L / L->L categories.
- `html`: the self-contained token page (also logged by the trainer with `train.token_view_every`).
- `token_view`: the trainer's periodic token view.
- `media`: logging pages and plots to the analyzed run's wandb run.
"""
