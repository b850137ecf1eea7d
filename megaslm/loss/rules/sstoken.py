"""ssToken's retrospective excess loss (arXiv 2510.18250): score `retrospective`.

    REL(x_i) = L_history(x_i) - L_current(x_i)

The history model is the run's reference (`reference.*`): an exponential moving average of the trained model
(`reference.ema_decay`, ssToken's self-modulated history) or a fixed model (`reference.path`, e.g. the base model
before fine-tuning, or `reference.cache` of its losses). A high REL marks tokens the model is learning now (its
loss fell below the history's); tokens it has not moved on, or got worse at, rank last. Any weighting applies
(topk: ssToken's top-k). Useful for SFT on loss-masked shards: only the response tokens carry labels.
Only the loss-based half of ssToken is here; its attention-based semantic score is not.
"""

from __future__ import annotations

from megaslm.loss.weights import Score, register_score


@register_score
class Retrospective(Score):
    name = "retrospective"
    needs_reference = True
    missing_reference = ("reference.ema_decay", "or reference.path is required with slm.score retrospective (the "
                         "history model: an average of the trained model, or a fixed model such as the base model)")

    def __call__(self, token_loss, ref_loss, head):
        return ref_loss - token_loss
