"""The token view during training (`train.token_view_every: N`): a drifting selection is visible while the run goes.

Every N steps every rank scores one fixed sample (the first min(micro_batch_size, 4) sequences of `data.valid`,
else of `data.train`; the same on every rank, so ZeRO-3 and tensor-parallel forwards line up) with the trained
model and, for SLM with an online reference, with the reference. Rank 0 selects the top `slm.ratio` of the
sample's tokens by excess loss (over the sample alone: the view shows what the selection rule does to this text,
not the training batch's selection) and writes the token page (megaslm/analyze/html.py) to
RUN_DIR/token_view/step_XXXXXXXX.html, and logs it to wandb as `token_view` (a `wandb.Html`) when wandb is on.
With a cached reference (`reference.cache`) there are no reference losses for held-out text: the page shows the
model's losses alone.
"""

from __future__ import annotations

import torch

from megaslm.analyze import html as page
from megaslm.analyze.documents import pieces
from megaslm.atomic import write_text
from megaslm.data.loader import IGNORE_INDEX, PackedLoader, model_inputs
from megaslm.loss import select_tokens
from megaslm.callbacks import Callback

MAX_SEQUENCES = 4


class TokenView(Callback):
    def __init__(self, every: int):
        self.every = every
        self.batch = None

    def on_train_start(self, trainer) -> None:
        cfg = trainer.cfg
        shards = next(iter(trainer.data.valid.values()), None) or trainer.train_shards
        self.source = shards.path
        n = min(cfg.train.micro_batch_size, MAX_SEQUENCES)
        loader = PackedLoader(shards, cfg.train.seq_len, n, eval_only=True, document_mask=cfg.data.document_mask)
        self.batch = next(iter(loader.eval_batches(n)))
        self.ratio = cfg.slm.ratio if cfg.objective == "slm" else None
        self.tokenizer = None
        if trainer.is_main:
            from megaslm.analyze.scoring import run_tokenizer

            self.tokenizer = run_tokenizer(trainer.run_dir)
        self.out_dir = trainer.run_dir / "token_view"

    def post_step(self, trainer, rec: dict) -> None:
        self.maybe_log(trainer, trainer.step)

    @torch.no_grad()
    def _losses(self, trainer) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = self.batch["input_ids"].to(trainer.device)
        labels = self.batch["labels"].to(trainer.device)
        extra = model_inputs(self.batch, trainer.device)  # position_ids under data.document_mask
        trainer.engine.eval()
        loss = trainer.engine(ids, labels, **extra).float().cpu()
        trainer.engine.train()
        ref = None
        if trainer.reference is not None and hasattr(trainer.reference, "losses"):  # online, not a cache
            ref = trainer.reference.losses(ids, labels, extra.get("position_ids")).float().cpu()
        return loss, ref

    def maybe_log(self, trainer, step: int) -> None:
        """On every rank after each step (post_step); does the work every `every` steps."""
        if not self.every or step % self.every:
            return
        loss, ref = self._losses(trainer)
        if not trainer.is_main:
            return
        valid = self.batch["labels"] != IGNORE_INDEX
        sel = None
        if ref is not None and self.ratio is not None:  # scope "rank": this process alone, no collectives
            sel = select_tokens(loss - ref, valid, self.ratio, scope="rank")
        views = []
        for i in range(loss.shape[0]):
            m = valid[i]
            ids = self.batch["labels"][i][m].numpy()
            views.append(page.DocView(f"sequence {i}", pieces(self.tokenizer, ids), loss[i][m].numpy(),
                                      ref[i][m].numpy() if ref is not None else None,
                                      sel[i][m].numpy() if sel is not None else None))
        note = [f"step {step}; {len(views)} held-out sequences from {self.source}"
                + (f"; top {self.ratio:g} of these tokens by excess loss marked" if sel is not None else "")]
        text = page.render_page(f"token view at step {step}", note, views, [])
        self.out_dir.mkdir(exist_ok=True)
        write_text(self.out_dir / f"step_{step:08d}.html", text)
        mon = trainer.monitor
        if mon.wandb is not None:
            import wandb

            mon._wandb_call(lambda: mon.wandb.log({"token_view": wandb.Html(text, inject=False)}, step=step))
