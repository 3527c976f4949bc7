"""The lexical branch: per task, a bag of token n-grams beside the neural head.

A small sentence encoder keeps the meaning of a text and throws its exact words away; on tasks
decided by vocabulary (a period, an author, a product code) a bag of words beats it. Each task
may therefore keep a lexical branch of its own and fuse it with its neural head:

    log p(y | x) = (1 - mix) * log softmax(neural logits) + mix * log p_lexical(y | x) + const

Features are the backbone tokenizer's token ids (what every prediction path already has: the
server, bulk scoring and evaluation predict from ids) of the whole text, not only the
`max_length` tokens the encoder reads, unigrams and bigrams, hashed into 2^18 columns, weighted
by sublinear tf x idf. Of the columns seen in at least `MIN_DF` (2) of the task's training
texts, the `COLUMNS` with the highest chi-squared score on them are kept (sorted, int32), with
their weight (float16: idf x the square root of the column's naive Bayes ratio, below), and a
multinomial logistic regression over them (rows kept sparse, so memory follows the texts'
words, not the columns). Its weights are stored in int8 with one float32 scale per label (each
label's largest weight maps to 127). Against float16 weights, on the bundled stream
(the same trained heads): 39 % fewer bytes, and 3 of 2,160 test texts changed answer for the
worse (fused ACC 78.34 against 78.48, with the finer mix grid below):

    bytes per task <= COLUMNS x (4 + 2 + labels) + 8 x labels + 6   (5 labels: ~180 KB,
                                                                     20 labels: ~426 KB)

16,384 columns and C up to 1000, chosen on two streams (the same trained heads, the branch
refitted beside them, fused test accuracy, int8 weights): the bundled stream and the first five
tasks of the scale stream (scripts/build_scale_stream.py: fortune topics, GCIDE parts of speech,
man-page sections, Debian sections, code languages). ACC bundled / scale-five:

    4,096 columns, C in {1, 10, 100}                    77.16* / 80.90
    16,384 columns, C in {1, 10, 100}                   77.91  / 80.99
    16,384 columns, C in {1, 10, 100, 1000}             78.01  / 81.04   (kept)
    the same, mix grid with 0.625 and 0.875 added       78.34  / 80.48
    65,536 columns (C to 1000, the finer mix grid)      78.71* / -
                                                        (* float16 weights)

A finer mix grid won on one stream and lost on the other (noise in choosing on a few hundred
validation texts), so the grid stays coarse. Validation chose C at the top of the former grid
on most bundled tasks, so the grid reaches 1000. Beyond 16,384 columns the state grows to 1 MB
a task for differences within noise. C up to 10,000 as well (measured later, with the words the
vocabulary lacks kept apart): 79.04 / 81.13, as with 1,000, and 61.50 against 61.43 (one text)
on seven tasks in other scripts, so the grid ends at 1000.

The mix chosen by the likelihood at each candidate's best temperature (fused scores divided by a
fitted t before the softmax, so that the choice weighs how the two parts rank the labels, not
how sharp their sum is; the same trained heads, measured and left out 2026-12-07): bundled seeds
0-3 79.04 / 78.08 / 78.57 / 78.95 -> 78.46 / 78.38 / 78.25 / 78.52, scale-five 81.13 -> 81.02,
seven tasks in other scripts 61.43 -> 61.62, sixteen in Latin and Cyrillic languages 60.42 ->
60.42. Chosen by validation accuracy (ties by likelihood): 78.92 / 77.99 / 77.88 / 78.54, 80.59,
61.41, 59.25. The likelihood as it is stays.

Columns seen in a single training text are not kept (`MIN_DF`; 2026-12-07, the same trained
heads, branches refitted as learning fits them; ACC before -> after): bundled stream seeds 0-4:
79.04 / 78.08 / 78.57 / 78.95 / 79.11 -> 79.17 / 78.77 / 78.93 / 79.33 / 79.51 (mean 78.75 ->
79.14), scale-five 81.13 -> 81.32, seven tasks in other scripts 61.43 -> 62.05, sixteen in Latin
and Cyrillic languages 60.42 -> 60.15 (5 tasks up, 8 down, by up to 3.2 points on French manual
sections; still above TF-IDF on the same 14 of 16). An n-gram of one text has the highest idf
and, when that text's label is the only one it falls in, a high chi-squared score: 71 % of the
columns WordNet glosses kept were such n-grams, which the regression fitted to single texts. The
branch is smaller for it: WordNet glosses keep 4,705 columns, Bible books 8,093, Austen 14,954
(State of the Union eras and Brown genres still fill the 16,384); the tasks of 400 texts keep
819-11,411 where they kept 1,269-16,384.

`Candidates` chooses the regularisation and `mix` on a validation split held out from the training
texts (the neural head's log-probabilities on it are given), never on test; mix 0 (no branch)
is one of the choices, so a task where words do not help keeps its neural answers, and mix 1
(words alone) another, for documents of which the encoder reads a small part.

Whole texts (benchmarks/lexical_features.py: the same trained heads, the branch refitted; ACC
bundled / scale-five / long documents, scripts/build_long_stream.py: 300-900 tokens a text):

    the encoder's part (the first 128 tokens), words     78.09 / 81.10 / 81.86
    the whole text, words                                78.03 / 81.20 / 96.67   (kept)
    the whole text, words + each word's char 3-5-grams   78.31 / 80.52 / 97.69
      at half weight

Branches fitted before read the encoder's part of a text and keep doing so (`whole_text`
False), so their answers do not change. Character n-grams won on two streams and lost 0.68
points on the third, so they are not in the branch.

Character n-grams chosen per task (measured and left out, 2026-12-07; the same trained heads,
`char_features` of benchmarks/lexical_features.py): each task's branch fitted three ways (words;
words + char 3-5-grams at half weight; words + char 2-5-grams at full weight) and the one with
the best fused validation log-likelihood kept. ACC bundled 79.04 -> 78.92, scale-five 81.13 ->
80.87, seven tasks in other scripts 61.43 -> 63.73, sixteen in Latin and Cyrillic languages
60.42 -> 60.74: 12 of 33 tasks gained, 9 lost. The gains were tasks whose words the vocabulary
splits or lacks (Chinese manual sections 65.33 -> 70.00, Russian fortunes 33.0 -> 36.5, the
Emacs tutorial's language 92.0 -> 95.5); the losses, English tasks among them, where validation
preferred characters by a few thousandths of log-likelihood (Austen -0.63, English manual
sections -1.72, Czech fortunes -3.57). Three fits a task for a choice that lowers both English
streams: the branch reads words.

Words the vocabulary lacks: the encoder reads such a word (a Chinese character MiniLM's
vocabulary lacks, a run of Japanese kana) as the one unknown token, and a bag of the encoder's
ids cannot tell those words apart: half the tokens of a Chinese manual-page task were unknown.
`Backbone.tokenize_whole` gives each an id of its own above the vocabulary (a hash of the word
as the tokenizer normalised it), and branches fitted since read those (`unknown_words`);
branches saved before read them as the unknown token, as they were fitted. Seven tasks of the
scale stream in Chinese, Japanese, Russian and other languages (400 training, up to 200 test
texts each; `ctt bench` on them, the same trained heads): ACC 60.2 -> 61.4, the Chinese manual
sections 56.0 -> 65.3 (TF-IDF + logistic regression: 60.4 and 59.3); on the bundled stream no
token is unknown, so nothing changes there. Measured and left out: each such word's character
2-3-grams as ids of their own beside the word's (the same heads): Chinese manual sections
65.33 -> 60.67, Japanese program messages 38.67 -> 32.67, Japanese manual sections 50.67 ->
46.00, the Emacs tutorial's language 92.0 -> 94.0, radicals and Russian fortunes unchanged.

Naive Bayes weighting (`_nb_ratio`; after NB-SVM, Wang and Manning 2012): each kept column's idf
is multiplied by r^g, r the largest |log-count ratio| of the column between one label and the
rest (add-one smoothing), before rows are L2-normalised; it is folded into the stored idf, so it
costs no byte. The same trained heads, branches refitted (ACC bundled / scale-five; the branch
alone in brackets; the third stream: long documents):

    g = 0 (plain tf x idf)        78.03 (73.75) / 81.20 (71.38) / 96.67 (97.76)
    g = 0.5                       79.04 (74.78) / 81.13 (71.88) / 97.69 (97.69)   (kept)
    g = 1                         78.90 (74.54) / 81.24 (71.43) / 97.31 (96.92)

On the bundled stream g = 0.5 moved State of the Union eras 70.25 -> 73.75 and Austen 78.75 ->
80.00 (WordNet -0.25); on scale-five it is a tie; on long documents the fused ACC gains 1.0
(Bible books 97.44 -> 100, the branch now chosen alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

HASH_BITS = 18
COLUMNS = 16384
MIN_DF = 2  # texts a column must be seen in to be kept (an n-gram of one text is noise)
C_GRID = (1.0, 10.0, 100.0, 1000.0)  # inverse L2 strength, per example
MIX_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
PREFIX = "lexical."
_MASK = (1 << HASH_BITS) - 1
_BIGRAM = 1_000_003
_MULTIPLIER = 2_654_435_761  # Knuth's multiplicative hash: the same columns in every process


def row_features(ids: Sequence[int], skip: frozenset[int]) -> tuple[np.ndarray, np.ndarray]:
    """(columns, sublinear tf) of one text's hashed unigrams and bigrams (sorted columns)."""
    tokens = np.array([t for t in ids if t not in skip], dtype=np.int64)
    keys = np.concatenate([tokens, tokens[:-1] * _BIGRAM + tokens[1:] + (1 << 40)])
    columns, counts = np.unique((keys * _MULTIPLIER) & _MASK, return_counts=True)
    return columns, 1.0 + np.log(counts)


class _Rows:
    """Hashed features of many texts, as flat arrays (a CSR matrix without scipy)."""

    def __init__(self, ids_rows: Sequence[Sequence[int]], skip: frozenset[int]):
        parts = [row_features(ids, skip) for ids in ids_rows]
        self.n = len(parts)
        self.row = np.repeat(np.arange(self.n), [len(c) for c, _ in parts])
        self.col = np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.int64)
        self.tf = np.concatenate([v for _, v in parts]) if parts else np.zeros(0)

    def __add__(self, other: "_Rows") -> "_Rows":
        """The rows of `self`, then those of `other` (no text hashed again)."""
        out = object.__new__(_Rows)
        out.n = self.n + other.n
        out.row = np.concatenate([self.row, other.row + self.n])
        out.col = np.concatenate([self.col, other.col])
        out.tf = np.concatenate([self.tf, other.tf])
        return out

    def on(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, position in `columns`, tf) of the entries whose column is kept (`columns` sorted)."""
        position = np.minimum(np.searchsorted(columns, self.col), len(columns) - 1)
        hit = columns[position] == self.col
        return self.row[hit], position[hit], self.tf[hit]

    def matrix(self, columns: np.ndarray, idf: np.ndarray) -> torch.Tensor:
        """(n, K) sparse tf x idf on the kept `columns` (sorted), each row L2-normalised."""
        rows, kept, tf = self.on(columns)
        values = tf * idf[kept]
        norms = np.sqrt(np.bincount(rows, weights=values**2, minlength=self.n))
        values = values / np.maximum(norms[rows], 1e-12)
        index = torch.from_numpy(np.stack([rows, kept]).astype(np.int64))
        return torch.sparse_coo_tensor(index, torch.from_numpy(values.astype(np.float32)),
                                       (self.n, len(columns)), is_coalesced=True,
                                       check_invariants=False)  # sorted and unique by construction


@dataclass
class LexicalBranch:
    """One task's kept columns, their idf, a linear classifier over them and its mix weight."""

    columns: torch.Tensor  # (K,) int32, sorted
    idf: torch.Tensor  # (K,) column weights, float16 (float32 in branches saved before int8
    # weights; plain idf in branches saved before naive Bayes weighting: they read as they were fitted)
    weight: torch.Tensor  # (C, K) int8, times `scale` per row (float16 before, no scale)
    bias: torch.Tensor  # (C,) float32
    mix: float
    scale: torch.Tensor | None = None  # (C,) float32
    # Fitted on each text as a whole (`Backbone.tokenize_whole`), so it reads the whole text
    # at prediction too; branches saved before read the encoder's part (`max_length` tokens)
    # and keep doing so, so their answers do not change.
    whole_text: bool = False
    # Fitted on ids that keep the words the vocabulary lacks (`Backbone.tokenize_whole`);
    # branches saved before read those as the unknown token and keep doing so.
    unknown_words: bool = False

    def log_probs(self, ids_rows: Sequence[Sequence[int]], skip: frozenset[int]) -> torch.Tensor:
        """(N, C) log-probabilities of the task's labels from the words alone."""
        # The int32 columns are searched as they are stored: an int64 copy kept per task
        # would double the branch's resident size for a few microseconds per call.
        x = _Rows(ids_rows, skip).matrix(self.columns.numpy(), self.idf.float().numpy())
        logits = torch.sparse.mm(x, self.weight.float().T)
        if self.scale is not None:  # x @ (q * s).T == (x @ q.T) * s: no dequantized copy
            logits = logits * self.scale
        return torch.log_softmax(logits + self.bias, dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {PREFIX + "columns": self.columns, PREFIX + "idf": self.idf,
               PREFIX + "weight": self.weight, PREFIX + "bias": self.bias,
               PREFIX + "mix": torch.tensor([self.mix], dtype=torch.float32)}
        if self.scale is not None:
            out[PREFIX + "scale"] = self.scale
        if self.whole_text:
            out[PREFIX + "whole_text"] = torch.ones(1, dtype=torch.uint8)
        if self.unknown_words:
            out[PREFIX + "unknown_words"] = torch.ones(1, dtype=torch.uint8)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LexicalBranch | None":
        if PREFIX + "weight" not in tensors:
            return None  # a task learned without one (or before branches existed)

        def flag(name: str) -> bool:
            value = tensors.get(PREFIX + name)
            return value is not None and bool(value.any())

        return cls(tensors[PREFIX + "columns"], tensors[PREFIX + "idf"], tensors[PREFIX + "weight"],
                   tensors[PREFIX + "bias"], float(tensors[PREFIX + "mix"][0]),
                   tensors.get(PREFIX + "scale"), flag("whole_text"), flag("unknown_words"))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def fuse(neural_logits: torch.Tensor, lexical_log_probs: torch.Tensor, mix: float) -> torch.Tensor:
    """(N, C) fused scores; their softmax is the fused distribution."""
    return (1 - mix) * torch.log_softmax(neural_logits.float(), dim=-1) + mix * lexical_log_probs


def _select(rows: _Rows, y: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept columns, their column weights): of the columns seen in at least `MIN_DF` texts,
    the `COLUMNS` of the highest chi-squared score, each weighted by its smooth idf times the
    square root of its naive Bayes ratio."""
    seen, df = np.unique(rows.col, return_counts=True)
    idf = np.log((1 + rows.n) / (1 + df)) + 1.0
    eligible = df >= MIN_DF
    if not eligible.any():  # no n-gram repeats in any two texts: keep what there is
        eligible[:] = True
    columns = _chi2_top(rows, y, n_labels, seen, idf, eligible)
    return columns, idf[np.searchsorted(seen, columns)] * np.sqrt(_nb_ratio(rows, y, n_labels, columns))


def _nb_ratio(rows: _Rows, y: np.ndarray, n_labels: int, columns: np.ndarray) -> np.ndarray:
    """Per kept column, the largest |log ratio| over labels of its smoothed share of the
    label's tf against its share of the other labels' tf (naive Bayes log-count ratios, as in
    NB-SVM, Wang and Manning 2012, taken one label against the rest): words that tell labels
    apart weigh more before the logistic regression sees them."""
    row, position, tf = rows.on(columns)
    counts = np.zeros((n_labels, len(columns)))
    np.add.at(counts, (y[row], position), tf)
    rest = counts.sum(0, keepdims=True) - counts
    share = (counts + 1) / (counts + 1).sum(1, keepdims=True)
    rest_share = (rest + 1) / (rest + 1).sum(1, keepdims=True)
    return np.abs(np.log(share / rest_share)).max(0)


def _chi2_top(rows: _Rows, y: np.ndarray, n_labels: int, columns: np.ndarray, idf: np.ndarray,
              eligible: np.ndarray) -> np.ndarray:
    """Of the `eligible` columns, the `COLUMNS` (sorted) with the highest chi-squared score
    against the labels."""
    position = np.searchsorted(columns, rows.col)
    value = rows.tf * idf[position]
    observed = np.zeros((n_labels, len(columns)))
    np.add.at(observed, (y[rows.row], position), value)
    prior = np.bincount(y, minlength=n_labels) / len(y)
    expected = np.outer(prior, observed.sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.nan_to_num(((observed - expected) ** 2 / expected).sum(0))
    score[~eligible] = -1.0  # scores are >= 0: never kept
    keep = np.argsort(-score, kind="stable")[:COLUMNS]
    return np.sort(columns[keep[score[keep] >= 0]])


def _logistic(x: torch.Tensor, y: torch.Tensor, n_labels: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on sparse rows `x`, L2 penalty 1 / (2 c n) on the
    weights, by L-BFGS."""
    torch.manual_seed(0)
    weight = torch.zeros(n_labels, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_labels, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=200, history_size=10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(torch.sparse.mm(x, weight.T) + bias, y)
        loss = loss + (weight**2).sum() / (2 * c * len(y))
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


@torch.no_grad()
def _fused_score(neural: torch.Tensor, lexical: torch.Tensor, y: torch.Tensor, mix: float) -> tuple:
    fused = torch.log_softmax(fuse(neural, lexical, mix), dim=-1)
    accuracy = float((fused.argmax(1) == y).float().mean())
    # Mean log-likelihood first: on a few hundred texts, accuracy moves in steps of a text
    # and picks the weight by luck; the likelihood of the fused distribution does not.
    return float(fused[torch.arange(len(y)), y].mean()), accuracy


class Candidates:
    """A task's lexical classifiers for every regularisation in `C_GRID`, fitted on the fit
    split once, and their log-probabilities on the validation split: the mix with any neural
    head's validation logits is then chosen without refitting (a search's trials share them)."""

    def __init__(self, fit_ids: Sequence[Sequence[int]], fit_y: Sequence[int],
                 val_ids: Sequence[Sequence[int]], val_y: Sequence[int], n_labels: int,
                 skip: frozenset[int], *, whole_text: bool = False):
        self.whole_text = whole_text  # the ids are whole texts' (the branch will read those)
        self.fit_rows, self.val_rows = _Rows(fit_ids, skip), _Rows(val_ids, skip)
        self.y_fit, self.y_val = np.asarray(fit_y), torch.tensor(list(val_y))
        self.n_labels = n_labels
        columns, idf_kept = _select(self.fit_rows, self.y_fit, n_labels)
        x_fit, x_val = self.fit_rows.matrix(columns, idf_kept), self.val_rows.matrix(columns, idf_kept)
        self.val_log_probs = {}  # c -> (N_val, C)
        for c in C_GRID:
            weight, bias = _logistic(x_fit, torch.from_numpy(self.y_fit), n_labels, c)
            self.val_log_probs[c] = torch.log_softmax(torch.sparse.mm(x_val, weight.T) + bias, dim=-1)

    def choose(self, val_neural_logits: torch.Tensor) -> dict:
        """The regularisation and mix with the best validation log-likelihood, fused with these
        neural logits (N_val, C), and the validation accuracies with and without the branch."""
        best = None
        for c, lexical in self.val_log_probs.items():
            for mix in MIX_GRID:
                score = _fused_score(val_neural_logits, lexical, self.y_val, mix)
                if best is None or score > best[0]:
                    best = (score, c, mix)
        (_, accuracy), c, mix = best
        neural = _fused_score(val_neural_logits, self.val_log_probs[c], self.y_val, 0.0)[1]
        return {"c": c, "mix": mix, "val_accuracy": round(accuracy, 4),
                "val_accuracy_neural": round(neural, 4), "validation_texts": len(self.y_val)}

    def branch(self, chosen: dict) -> LexicalBranch | None:
        """The branch for the chosen settings, refitted on fit + validation (None for mix 0)."""
        if chosen["mix"] == 0.0:
            return None
        all_y = np.concatenate([self.y_fit, self.y_val.numpy()])
        rows = self.fit_rows + self.val_rows
        columns, idf_kept = _select(rows, all_y, self.n_labels)
        idf_kept = idf_kept.astype(np.float16)  # fitted on the idf it will predict with
        weight, bias = _logistic(rows.matrix(columns, idf_kept.astype(np.float64)),
                                 torch.from_numpy(all_y), self.n_labels, chosen["c"])
        quantized, scale = quantize(weight)
        return LexicalBranch(torch.from_numpy(columns.astype(np.int32)),
                             torch.from_numpy(idf_kept), quantized, bias.float(), chosen["mix"],
                             scale, self.whole_text,
                             unknown_words=self.whole_text)  # whole texts' ids keep them


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, float32 scale per row): row r is about int8[r] * scale[r]."""
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).float()
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

