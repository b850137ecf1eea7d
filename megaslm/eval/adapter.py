"""megaslm as an lm-evaluation-harness model: `MegaslmLM`, an `lm_eval` `TemplateLM`.

lm-eval builds the requests and computes the metrics; this class only scores. Tokenization follows lm-eval's
own (`TemplateLM._encode_pair`: the context + continuation is encoded whole and split at the context's length;
an empty context is the BOS, else EOS, token), so the same task gives the same tokens as its `hf` backend.

Log-likelihoods come from megaslm's loss head: a `TokenScorer` returns the per-token cross-entropy of a batch
(`per_token_ce` on the final hidden states and the LM head's weight), so `[batch, seq, vocab]` logits never
exist. Two scorers: `HFScorer` on a Hugging Face model (an export, or the trained model under ZeRO 0-2) and
`EngineScorer` on the live training engine (any ZeRO stage, tensor parallel included).

Distributed (the in-loop evaluator): every rank builds the same requests; the batches are formed once over all
of them (longest first) and batch b runs on data-parallel rank b mod N, the last round padded with repeats so
that every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively). Each rank writes its
batches' results into a zero-filled [requests, 2] float64 tensor and one all-reduce (sum) over the data-parallel
group gives every rank all results. A batch holds the same requests whatever N is, so the figures do not depend
on the number of ranks.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM

from megaslm.loss import per_token_ce

IGNORE = -100


class TokenScorer:
    """(input_ids [B, T], labels [B, T]) -> (per-token CE [B, T] float32, 0 at IGNORE; greedy [B, T] bool or
    None): greedy[b, t] says that labels[b, t] is the arg-max token at that position."""

    device: torch.device

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


def greedy_tokens(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Whether each labelled token is the model's arg-max, from the logits of the labelled positions only, one
    vocabulary block at a time (the continuation's tokens, not the batch's)."""
    out = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    where = labels != IGNORE
    if not where.any():
        return out
    h = hidden[where].float()
    target = labels[where]
    best = torch.full((h.shape[0],), -math.inf, device=h.device)
    for s in range(0, weight.shape[0], block):
        best = torch.maximum(best, (h @ weight[s:s + block].float().T).max(dim=1).values)
    tgt = (h * weight[target].float()).sum(dim=1)
    # the target is the arg-max when no logit exceeds it (rounding of the two computations aside)
    out[where] = tgt >= best - 1e-5 * best.abs().clamp(min=1.0)
    return out


class HFScorer(TokenScorer):
    """A Hugging Face causal LM, not distributed or with full parameters (ZeRO 0-2, no tensor parallelism)."""

    def __init__(self, lm: torch.nn.Module, device: torch.device | None = None):
        self.lm = lm
        self.device = device or next(lm.parameters()).device

    @torch.no_grad()
    def __call__(self, input_ids, labels):
        hidden = self.lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        weight = self.lm.get_output_embeddings().weight
        # the head on the continuation's positions only: a few-shot context is most of the tokens
        where = labels != IGNORE
        h, y = hidden[where], labels[where]
        loss = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        greedy = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        loss[where] = per_token_ce(h, weight, y)
        greedy[where] = greedy_tokens(h, weight, y)
        return loss, greedy


class EngineScorer(TokenScorer):
    """The training engine (a DeepSpeed engine around TokenLossModel): its own forward, so ZeRO-3's parameter
    gathering and the vocab-parallel head work as in training. No arg-max here (the head's weight is not whole
    under ZeRO-3 / tensor parallelism): `is_greedy` is False, which only lm-eval's `loglikelihood` tasks' `acc`
    reads (not multiple choice, not bpb)."""

    def __init__(self, engine, device: torch.device):
        self.engine = engine
        self.device = device

    @torch.no_grad()
    def __call__(self, input_ids, labels):
        return self.engine(input_ids, labels), None


@dataclass
class Parallel:
    """Where this process sits among the data-parallel ranks that share the requests."""
    rank: int = 0
    size: int = 1
    group: object = None


class Progress:
    """Lines on stderr on rank 0: one when the scoring starts, then one every `every` seconds (from a timer
    thread, so a batch that takes minutes still shows the run alive): done/total, elapsed, ETA (by work:
    `weights`, e.g. each batch's padded tokens, since the longest batches come first). Use it as a context
    manager: leaving it stops the timer."""

    def __init__(self, total: int, what: str, show: bool, every: float = 15.0, weights: list[float] | None = None):
        self.total, self.what, self.show, self.every = total, what, show and total > 0, every
        self.cum = [0.0]
        for w in weights or [1.0] * total:
            self.cum.append(self.cum[-1] + w)
        self.t0 = time.time()
        self.done = 0
        self._stop = threading.Event()
        if self.show:
            print(f"megaslm eval: scoring {total} {what}, a line every {every:.0f} s", file=sys.stderr, flush=True)
            threading.Thread(target=self._tick, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self.line()

    def line(self) -> None:
        done = self.done
        el = time.time() - self.t0
        work = self.cum[done] / max(self.cum[-1], 1e-9)
        eta = f"ETA {el / work * (1 - work):.0f} s" if work > 0 else "ETA after the first one"
        print(f"megaslm eval: {self.what} {done}/{self.total}, {el:.0f} s elapsed, {eta}", file=sys.stderr, flush=True)

    def update(self, done: int) -> None:
        self.done = min(done, self.total)
        if self.done >= self.total:
            self._stop.set()


class MegaslmLM(TemplateLM):
    """lm-eval's model interface on a TokenScorer and a megaslm tokenizer.

    batch_tokens: padded tokens per forward (batch size x longest sequence), at least one sequence per batch.
    max_length: the model's context; longer inputs keep their last max_length tokens (as the hf backend).
    generator: for generate_until, a Hugging Face model with `.generate` (None: generation is refused).
    """

    def __init__(self, scorer: TokenScorer, tokenizer, *, max_length: int, batch_tokens: int = 8192,
                 parallel: Parallel | None = None, generator=None, progress: bool = True):
        super().__init__()
        self.scorer = scorer
        self.tok = tokenizer
        self.max_length = max_length
        self.batch_tokens = batch_tokens
        self.par = parallel or Parallel()
        self.generator = generator
        self.show_progress = progress and self.par.rank == 0
        self.forwards = 0  # batches this rank ran (the in-loop evaluator reports it)

    # ---------------------------------------------------------------- tokenization (lm-eval's TemplateLM calls)
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode_batch([string])[0] if string else []

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)  # tokenizing is quick; Progress reports scoring

    # ---------------------------------------------------------------- scoring
    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """The tokens to feed (context + continuation minus its last token, left-truncated to max_length) and
        how many of the last positions predict the continuation."""
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole, min(len(continuation), len(whole) - 1)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Request indices per batch: longest first, each batch within batch_tokens padded tokens."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        batches, cur = [], []
        for i in order:
            width = lengths[cur[0]] if cur else lengths[i]
            if cur and (len(cur) + 1) * width > self.batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]], what: str = "requests") -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities in nats, whether every continuation token is the arg-max)
        of each (context tokens, continuation tokens) pair; identical on every rank."""
        windows = [self._window(c, x) for c, x in pairs]
        lengths = [len(w) - 1 for w, _ in windows]
        batches = self._batches(lengths)
        n = self.par.size
        rounds = -(-len(batches) // n) if batches else 0
        out = torch.zeros(len(pairs), 2, dtype=torch.float64)
        # the work of a round: its batches' padded tokens (the longest batches come first)
        tokens = [len(bt) * lengths[bt[0]] for bt in batches]
        with Progress(rounds, what, self.show_progress,
                      weights=[sum(tokens[r * n:(r + 1) * n]) for r in range(rounds)]) as prog:
            for r in range(rounds):
                b = r * n + self.par.rank
                mine = b < len(batches)
                idx = batches[b] if mine else batches[-1]  # a repeat keeps this rank's forwards in step; dropped
                ll, greedy = self._forward([windows[i] for i in idx])
                if mine:
                    out[idx, 0] = ll
                    out[idx, 1] = greedy
                prog.update(r + 1)
        if n > 1:
            dev = self.scorer.device
            sums = out.to(dev)
            dist.all_reduce(sums, group=self.par.group)  # each request's result lives on exactly one rank
            out = sums.cpu()
        return [(float(a), bool(g > 0.5)) for a, g in out.tolist()]

    def _forward(self, windows: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(w) for w, _ in windows) - 1
        ids = torch.zeros(len(windows), width, dtype=torch.long)
        labels = torch.full((len(windows), width), IGNORE, dtype=torch.long)
        for i, (w, k) in enumerate(windows):
            t = torch.tensor(w, dtype=torch.long)
            ids[i, :len(w) - 1] = t[:-1]  # right padding: causal attention keeps it out of the real tokens
            labels[i, len(w) - 1 - k:len(w) - 1] = t[len(w) - k:]
        dev = self.scorer.device
        loss, greedy = self.scorer(ids.to(dev), labels.to(dev))
        self.forwards += 1
        ll = -loss.double().sum(dim=1).cpu()
        if greedy is None:
            g = torch.zeros(len(windows), dtype=torch.float64)
        else:
            lab = labels.to(dev) != IGNORE
            g = ((greedy | ~lab).all(dim=1)).double().cpu()
        return ll, g

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self.score_pairs([(ctx, cont) for _, ctx, cont in requests], "loglikelihood batches")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text in disjoint windows of max_length tokens (lm-eval's windowing)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                ctx, cont = make_disjoint_window(w)
                pairs.append((ctx, cont))
                owner.append(i)
        scores = self.score_pairs(pairs, "rolling windows")
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            out[i] += ll
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, one request at a time, cut at the first stop string."""
        if self.generator is None:
            raise RuntimeError("generation needs a Hugging Face model (megaslm eval on an export or a run), not the "
                               "training engine")
        out = []
        with Progress(len(requests), "generations", self.show_progress) as prog:
            for k, req in enumerate(requests):
                context, gen_kwargs = req.args
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.pop("max_gen_toks", 256))
                ids = self.tok_encode(context)[-(self.max_length - max_new):]
                text = self._generate(ids, max_new, until)
                for s in until:
                    text = text.split(s)[0] if s else text
                out.append(text)
                prog.update(k + 1)
        return out

    def _generate(self, ids: list[int], max_new: int, until: list[str]) -> str:
        from transformers import StoppingCriteria, StoppingCriteriaList

        n0 = len(ids)
        tok = self.tok

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return any(s and s in tok.decode(input_ids[0, n0:].tolist()) for s in until)

        dev = self.scorer.device
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        y = self.generator.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                    stopping_criteria=StoppingCriteriaList([Stop()]),
                                    pad_token_id=self.tok.eos_id, eos_token_id=self.tok.eos_id)
        return self.tok.decode(y[0, n0:].tolist())
