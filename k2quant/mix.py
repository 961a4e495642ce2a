"""Size-targeted GGUF mixes: one GGML type per tensor class and layer, chosen to fit a byte budget
with the least expected error (`k2quant convert --to gguf --target-size SIZE | --bpw B`).

Groups (each takes one type; a layer's stacked experts have one type in GGUF anyway):
`token_embd`, `output`, and per layer the attention (attn_q_a, attn_q_b, attn_kv_a_mqa, attn_k_b,
attn_v_b, attn_output), the dense MLP, the shared expert, the routed experts' gate and up, and the
routed experts' down. The types are llama.cpp's mainline k-quants and i-quants (`LADDER`; with
no importance matrix only those llama-quantize makes without one); a row width a type's blocks
do not divide takes llama-quantize's fallback, and its bytes are counted as written.

Sensitivity of a group at a type, by default measured ("measured"): for each of its matrices,
the noise-to-signal ratio of its outputs that the type's encoder (llama.cpp's procedure,
`--method rtn`) leaves, sum w_c dW_rc^2 / sum w_c W_rc^2 with the imatrix column weights w (none
for token_embd), on a sample of its weights (up to 64 rows of each matrix, two experts of each
routed tensor, two heads of attn_k_b / attn_v_b; over a routed tensor's experts weighted by their
share of the layer's tokens, from the imatrix counts, else uniform); the group's is the sum over
its matrices. Every matrix is thus one stage whose relative corruption counts alike, whatever its
size, except token_embd and output: every token's whole prediction passes through them (the
residual stream starts as the one and ends in the other), so each counts as many stages as the
model has layers. Cheap (no forward pass), from calibration's statistics, but blind to how much
each stage's error grows through the layers after it. On the demo's mini-K2 (bench/lowbit.py
--demo-model) an absolute error put token_embd at IQ1_M and lost to every stock mix; the ratio
without the layers' weight on token_embd / output lost at 2.3 bpw (by 4 standard errors to
IQ2_XXS) and won at 3.2; as here it wins at both. On the bench model (k2quant.minik2_bench) it
wins at both when the file is encoded with llama.cpp's procedures, which these errors measure
(`convert --target-size` defaults to --method rtn), and loses at 2.3 bpw through the mse search.
Without weights (a header-only inventory: "prior") each type's relative error on a
fixed Gaussian matrix stands in for the measurement, so groups differ only by size and number of
matrices (token_embd / output weighted the same way).

Allocation: each group's (bytes, error) options on their lower convex hull; all groups start at
their smallest option; the upgrade with the most error removed per byte is taken while it fits
(ties by group order), so the result is deterministic. The budget is the target less the
header, whose tensor infos are exact and key/values estimated, and the plan is then checked
against the target with its own header and padding (the budget shrinks and the allocation runs
again if it does not fit). The result is a Recipe (a llama.cpp file type for the metadata plus
one override per group), which `MixPlan.toml` writes as a recipe file that `convert --recipe`
turns into the same file.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint
from .convert_gguf import Importance, PlannedGGUF, plan_gguf
from .errors import K2QuantError
from .formats.gguf import metadata_bytes, split_kv_b
from .plan import GGUF_KV_BYTES_PER_TOKEN, GGUF_KV_FIXED, gguf_sizes
from .quant import ggml
from .recipe import LLAMA_FTYPES, Recipe, build_recipe

# smallest first; llama.cpp's mainline types (not ik_llama.cpp's, not the ternary TQ1_0 / TQ2_0)
LADDER = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K", "IQ3_S", "IQ4_XS", "Q4_K",
          "Q5_K", "Q6_K", "Q8_0")  # fmt: skip
CLASSES = ("token_embd", "output", "attention", "dense_mlp", "shared_expert", "routed_gate_up", "routed_down")
_PATTERNS = {  # the group's GGUF tensor names, as a recipe override pattern (layer filled in)
    "token_embd": r"^token_embd\.weight$",
    "output": r"^output\.weight$",
    "attention": r"^blk\.{layer}\.attn_\w+\.weight$",
    "dense_mlp": r"^blk\.{layer}\.ffn_(gate|up|down)\.weight$",
    "shared_expert": r"^blk\.{layer}\.ffn_(gate|up|down)_shexp\.weight$",
    "routed_gate_up": r"^blk\.{layer}\.ffn_(gate|up)_exps\.weight$",
    "routed_down": r"^blk\.{layer}\.ffn_down_exps\.weight$",
}
_FILE_TYPE = {"IQ1_S": "iq1_s", "IQ1_M": "iq1_m", "IQ2_XXS": "iq2_xxs", "IQ2_XS": "iq2_xs", "IQ2_S": "iq2_m",
              "Q2_K": "q2_k", "IQ3_XXS": "iq3_xxs", "Q3_K": "q3_k_m", "IQ3_S": "iq3_s", "IQ4_XS": "iq4_xs",
              "Q4_K": "q4_k_m", "Q5_K": "q5_k_m", "Q6_K": "q6_k", "Q8_0": "q8_0"}  # fmt: skip
SAMPLE_ROWS = 64
SAMPLE_MATRICES = 2


class MixError(K2QuantError):
    pass


def group_of(name: str) -> tuple[str, int | None] | None:
    """(class, layer) of a quantizable GGUF tensor; None for the F32 ones (norms, router, biases)."""
    if name in ("token_embd.weight", "output.weight"):
        return name.split(".")[0], None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if not m:
        return None
    layer, part = int(m.group(1)), m.group(2)
    if part.startswith("attn_") and not part.endswith("_norm"):
        return "attention", layer
    if part in ("ffn_gate", "ffn_up", "ffn_down"):
        return "dense_mlp", layer
    if part in ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"):
        return "shared_expert", layer
    if part in ("ffn_gate_exps", "ffn_up_exps"):
        return "routed_gate_up", layer
    if part == "ffn_down_exps":
        return "routed_down", layer
    return None


@dataclass
class Group:
    cls: str
    layer: int | None
    tensors: list[PlannedGGUF]
    options: dict[str, tuple[int, float]] = field(default_factory=dict)  # type -> (bytes, expected error)
    type: str = ""

    @property
    def label(self) -> str:
        return self.cls if self.layer is None else f"blk.{self.layer} {self.cls}"

    @property
    def pattern(self) -> str:
        return _PATTERNS[self.cls].format(layer=self.layer)

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)


@dataclass
class MixPlan:
    target: str  # as given ("240G", "2.4 bpw")
    target_bytes: int  # the file (--target-size) or tensor data (--bpw) must not pass this
    counted: str  # "file" | "data"
    sensitivity: str  # "measured" | "prior"
    groups: list[Group]
    preset: str  # the llama.cpp file type written to general.file_type
    file_bytes: int  # planned, header included
    data_bytes: int
    params: int  # every weight in the file

    @property
    def bpw(self) -> float:
        return 8 * self.data_bytes / self.params

    def overrides(self) -> list[str]:
        return [f"{g.pattern}={g.type.lower()}" for g in self.groups]

    def recipe(self) -> Recipe:
        return build_recipe(self.preset, overrides=self.overrides(), target="gguf")

    def toml(self) -> str:
        """The mix as a recipe file: `k2quant convert --to gguf --recipe FILE` makes the same file."""
        lines = [f"# k2quant mix for {self.target} ({self.sensitivity} sensitivity): {self.file_bytes} bytes, "
                 f"{self.bpw:.3f} bits per weight", f'preset = "{self.preset}"', ""]  # fmt: skip
        for g in self.groups:
            lines += ["[[override]]", f"pattern = '{g.pattern}'", f'scheme = "{g.type.lower()}"', ""]
        return "\n".join(lines)

    def summary(self) -> dict:
        return {"target": self.target, "target_bytes": self.target_bytes, "counted": self.counted,
                "sensitivity": self.sensitivity, "file_type": self.preset, "file_bytes": self.file_bytes,
                "data_bytes": self.data_bytes, "bits_per_weight": self.bpw,
                "groups": [{"class": g.cls, "layer": g.layer, "type": g.type, "bytes": g.options[g.type][0],
                            "expected_error": g.options[g.type][1]} for g in self.groups]}  # fmt: skip

    def table(self) -> list[tuple[str, str, int, float]]:
        """(class, types by layer, bytes, share of the tensor data) per class, in CLASSES order."""
        rows = []
        for cls in CLASSES:
            gs = [g for g in self.groups if g.cls == cls]
            if not gs:
                continue
            nbytes = sum(g.options[g.type][0] for g in gs)
            runs: list[list] = []  # [first layer, last layer, type]
            for g in gs:
                if runs and runs[-1][2] == g.type and runs[-1][1] == (g.layer or 0) - 1:
                    runs[-1][1] = g.layer
                else:
                    runs.append([g.layer, g.layer, g.type])
            types = ", ".join(t if a is None else f"{a}{'' if a == b else f'-{b}'}:{t}" for a, b, t in runs)
            rows.append((cls, types, nbytes, nbytes / self.data_bytes))
        return rows


def format_mix(mix: MixPlan) -> str:
    """The chosen mix, one line per class (types by layer), for the console."""
    lines = [f"mix for {mix.target} ({mix.sensitivity} sensitivity): {mix.file_bytes / 1e9:.3f} GB file, "
             f"{mix.bpw:.3f} bits per weight, file type {mix.preset}"]  # fmt: skip
    for cls, types, nbytes, share in mix.table():
        lines.append(f"  {cls:15} {nbytes / 1e9:9.3f} GB {100 * share:5.1f}%  {types}")
    return "\n".join(lines)


def parse_bpw(text: str) -> float:
    try:
        b = float(text)
    except ValueError:
        raise MixError(f"--bpw {text!r}: expected a number of bits per weight, e.g. 2.4") from None
    if not 1.0 <= b <= 16.0:
        raise MixError(f"--bpw {b}: expected 1 to 16 bits per weight (IQ1_S is 1.56, BF16 16)")
    return b


def ladder(has_imatrix: bool) -> tuple[str, ...]:
    return LADDER if has_imatrix else tuple(t for t in LADDER if t not in ggml.NEEDS_IMATRIX)


# ---------------------------------------------------------------------------- sensitivity
def _rows(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Up to SAMPLE_ROWS evenly spaced rows of w, and the factor from them to all rows."""
    n = w.shape[0]
    if n <= SAMPLE_ROWS:
        return w, 1.0
    idx = torch.linspace(0, n - 1, SAMPLE_ROWS).round().long()
    return w[idx], n / SAMPLE_ROWS


def _read_rows(ck: Checkpoint, src: str) -> tuple[torch.Tensor, float]:
    """Up to SAMPLE_ROWS rows of a 2-D source weight spread over it, read from its stored form
    (four runs of 16 rows at multiples of 128, so a large matrix is never decoded whole), and the
    factor from them to all rows."""
    n = ck.info(src).shape[0]
    if n < 4 * 128 or not hasattr(ck, "stored"):
        return _rows(ck.tensor(src, torch.float32))
    st = ck.stored(src)
    starts = [i * (n // 128 - 1) // 3 * 128 for i in range(4)]
    rows = torch.cat([st.rows(r, r + SAMPLE_ROWS // 4).dequantize(torch.float32) for r in starts])
    return rows, n / rows.shape[0]


def _samples(ck: Checkpoint, t: PlannedGGUF, imp: Importance, token_share: list[float]):
    """(rows, column importance or None, factor to the whole tensor times its token share) of t."""
    if t.kind == "experts":
        n = len(t.sources)
        picked = sorted({round(i * (n - 1) / max(1, SAMPLE_MATRICES - 1)) for i in range(SAMPLE_MATRICES)})
        if not any(token_share[e] for e in picked):  # no token reached them: count them as average experts
            token_share = [sum(token_share) / n or ck.config.num_experts_per_tok / n] * n
        for e in picked:
            rows, f = _rows(ck.tensor(t.sources[e], torch.float32))
            yield rows, imp.get(t.name, e), f * token_share[e] * n / len(picked)
    elif t.kind in ("k_b", "v_b"):
        heads = split_kv_b(ck.tensor(t.sources[0], torch.float32), ck.config, t.kind)
        for h in sorted({0, len(heads) // 2}):
            rows, f = _rows(heads[h])
            yield rows, imp.get(t.name, h, rows.shape[1]), f * len(heads) / len({0, len(heads) // 2})
    else:
        rows, f = _read_rows(ck, t.sources[0])
        yield rows, imp.get(t.name), f


def _token_shares(t: PlannedGGUF, imp: Importance, cfg) -> list[float]:
    """Each expert's share of the layer's tokens, from the imatrix counts (else top-k / n)."""
    n = len(t.sources)
    uniform = [cfg.num_experts_per_tok / n] * n
    entry = imp.data.get(t.name)
    tokens = imp.data.get(f"blk.{t.layer}.attn_kv_a_mqa.weight") or imp.data.get(f"blk.{t.layer}.attn_q_a.weight")
    if entry is None or tokens is None or tokens[1][0] <= 0 or len(entry[1]) != n:
        return uniform
    return [float(c) / float(tokens[1][0]) for c in entry[1]]


def _measure(ck: Checkpoint, g: Group, imp: Importance) -> None:
    """The group's error at each of its types, from its sampled weights (in place): the sum over its
    matrices of the importance-weighted noise-to-signal ratio (token-weighted over experts)."""
    stages = _stages(g, ck.config)
    err = dict.fromkeys(g.options, 0.0)
    for t in g.tensors:
        shares = _token_shares(t, imp, ck.config) if t.kind == "experts" else []
        noise, signal = dict.fromkeys(g.options, 0.0), 0.0
        for rows, col, f in _samples(ck, t, imp, shares):
            cw = col if col is not None else torch.ones(rows.shape[1])
            signal += f * float(((rows**2) * cw).sum())
            for typ in noise:
                fit = ggml.fit_type(typ, rows.shape[1])
                q = ggml.dequantize(ggml.quantize(rows, fit, col, search=False), fit, rows.shape[1])
                noise[typ] += f * float((((q - rows) ** 2) * cw).sum())
        for typ in err:
            err[typ] += stages * noise[typ] / signal if signal > 0 else 0.0
    g.options = {typ: (b, err[typ]) for typ, (b, _) in g.options.items()}


_REFERENCE: dict[str, float] = {}


def reference_error(typ: str) -> float:
    """The type's relative squared error on a fixed Gaussian 64 x 2048 matrix (--method rtn; the prior)."""
    if typ not in _REFERENCE:
        w = torch.randn(64, 2048, generator=torch.Generator().manual_seed(0))
        imp = torch.ones(2048)
        q = ggml.dequantize(ggml.quantize(w, typ, imp, search=False), typ, 2048)
        _REFERENCE[typ] = float(((q - w) ** 2).sum() / (w**2).sum())
    return _REFERENCE[typ]


def _stages(g: Group, cfg) -> int:
    """How many stages a group's matrices each count as (see the module docstring)."""
    return cfg.num_hidden_layers if g.cls in ("token_embd", "output") else 1


def _prior(g: Group, cfg) -> None:
    """The group's error at each of its types from each type's error on a Gaussian matrix (in place)."""
    g.options = {typ: (b, _stages(g, cfg) * len(g.tensors) * reference_error(typ)) for typ, (b, _) in g.options.items()}


# ---------------------------------------------------------------------------- allocation
def _hull(options: dict[str, tuple[int, float]]) -> list[str]:
    """The types on the lower convex hull of (bytes, error), smallest first."""
    pts = sorted(options.items(), key=lambda kv: (kv[1][0], kv[1][1], LADDER.index(kv[0])))
    kept: list[tuple[str, tuple[int, float]]] = []
    for typ, (b, e) in pts:
        if kept and (b == kept[-1][1][0] or e >= kept[-1][1][1]):
            continue  # the same size as a kept one, or no less error for more bytes
        while len(kept) >= 2:
            (_, (b1, e1)), (_, (b2, e2)) = kept[-2], kept[-1]
            if (e2 - e1) * (b - b1) >= (e - e1) * (b2 - b1):  # the middle point is not below the chord
                kept.pop()
            else:
                break
        kept.append((typ, (b, e)))
    return [typ for typ, _ in kept]


def allocate(groups: list[Group], budget: int) -> int:
    """Sets each group's type; returns the bytes used (at most `budget`)."""
    hulls = [_hull(g.options) for g in groups]
    pos = [0] * len(groups)
    used = sum(g.options[h[0]][0] for g, h in zip(groups, hulls, strict=True))
    if used > budget:
        raise MixError(f"the smallest mix needs {used} bytes of tensor data, more than the {budget} the target leaves")

    def step(i: int) -> tuple[float, int, int]:
        a, b = groups[i].options[hulls[i][pos[i]]], groups[i].options[hulls[i][pos[i] + 1]]
        return (b[1] - a[1]) / (b[0] - a[0]), i, b[0] - a[0]

    heap = [step(i) for i in range(len(groups)) if len(hulls[i]) > 1]
    heapq.heapify(heap)
    while heap:
        _, i, extra = heapq.heappop(heap)
        if used + extra > budget:
            continue  # this group's next step does not fit; its later ones are larger
        used += extra
        pos[i] += 1
        if pos[i] + 1 < len(hulls[i]):
            heapq.heappush(heap, step(i))
    for g, h, p in zip(groups, hulls, pos, strict=True):
        g.type = h[p]
    return used


# ---------------------------------------------------------------------------- the plan
def plan_mix(ck: Checkpoint, *, target_size: int | None = None, bpw: float | None = None,
             imatrix: str | None = None, sensitivity: str = "measured", assume_imatrix: bool = False,
             split_max_size: int = 0, stem: str = "", progress: bool = False) -> MixPlan:  # fmt: skip
    """The mix of the least expected error whose file is at most target_size bytes, or whose
    tensor data is at most bpw bits per weight of the file (every weight, F32 ones included).
    `assume_imatrix` (no `imatrix` file, prior sensitivity): plan as if one with an entry for every
    matrix but token_embd will be given to convert, as `plan --calib` does. `split_max_size`: the
    files convert will write (each with its header), as --split-max-size gives it; `stem`: the
    file name and general.name convert will write (the metadata is then measured, not estimated)."""
    if (target_size is None) == (bpw is None):
        raise MixError("a mix needs a target size or bits per weight (one of them)")
    types = ladder(imatrix is not None or assume_imatrix)
    base = plan_gguf(ck, build_recipe("q8_0", target="gguf"), "rtn", "mix", split_max_size)
    params = sum(t.params for t in base.tensors)
    if target_size is not None:
        target, target_bytes, counted = f"{target_size} bytes", target_size, "file"
    else:
        target, target_bytes, counted = f"{bpw} bits per weight", int(bpw * params / 8), "data"
    groups: dict[tuple[str, int | None], Group] = {}
    for t in base.tensors:
        key = group_of(t.name)
        if key is not None and t.type != "F32":
            groups.setdefault(key, Group(*key, tensors=[])).tensors.append(t)
    order = sorted(groups.values(), key=lambda g: (CLASSES.index(g.cls), -1 if g.layer is None else g.layer))
    imp = Importance(imatrix, {t.name for g in order for t in g.tensors})
    have = set(imp.data) if imatrix else {t.name for g in order for t in g.tensors if assume_imatrix}
    have.discard("token_embd.weight" if assume_imatrix and not imatrix else "")
    for g in order:  # the types this group can take: refused ones left out (convert's imatrix rules)
        for typ in types:
            fits = [ggml.fit_type(typ, t.shape[-1]) for t in g.tensors]
            if all(_allowed(t.name, f, have) for t, f in zip(g.tensors, fits, strict=True)):
                nbytes = [
                    math.prod(t.shape[:-1]) * ggml.TYPES[f].row_bytes(t.shape[-1])
                    for t, f in zip(g.tensors, fits, strict=True)
                ]
                g.options[typ] = (sum(nbytes), 0.0)
    if sensitivity == "measured":
        from tqdm import tqdm

        for g in tqdm(order, desc="sensitivity", unit="group", disable=not progress):
            _measure(ck, g, imp)
    elif sensitivity == "prior":
        for g in order:
            _prior(g, ck.config)
    else:
        raise MixError(f"sensitivity {sensitivity!r}: expected measured or prior")
    fixed = sum(t.nbytes for t in base.tensors if group_of(t.name) is None or t.type == "F32")
    budget = target_bytes - fixed
    kv_error = 0  # the measured metadata less the planner's estimate of it
    if counted == "file":  # the header, and each tensor's data 32-byte aligned
        kv = _metadata_bytes(ck, stem or "x" * 64, base.file_type)
        if kv is not None:
            kv_error = kv - (GGUF_KV_FIXED + GGUF_KV_BYTES_PER_TOKEN * ck.config.vocab_size) + 64  # + padding, stem
        budget -= gguf_sizes(base, ck.config.vocab_size)[2] + 32 * len(base.tensors) + kv_error
    for _ in range(4):
        allocate(order, budget)
        preset = _file_type(order)
        plan = plan_gguf(ck, build_recipe(preset, overrides=[f"{g.pattern}={g.type.lower()}" for g in order],
                                          target="gguf"), "rtn", "mix", split_max_size, bool(have))  # fmt: skip
        data, sizes, _ = gguf_sizes(plan, ck.config.vocab_size)
        total = sum(sizes) + kv_error if counted == "file" else data
        if total <= target_bytes:
            return MixPlan(target, target_bytes, counted, sensitivity, order, preset, sum(sizes) + kv_error, data,
                           params)  # fmt: skip
        budget -= total - target_bytes
    raise MixError(f"no mix under {target}: the planned file stays {total - target_bytes} bytes over")


def _metadata_bytes(ck: Checkpoint, stem: str, file_type: int) -> int | None:
    """The first file's key/value bytes as convert writes them (architecture keys, tokenizer, chat
    template), measured by writing them; None without the release's tokenizer files (an inventory)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        try:
            return metadata_bytes(ck.config, ck.path, stem, file_type, d)
        except (OSError, K2QuantError):
            return None


def _allowed(name: str, typ: str, have: set[str]) -> bool:
    """Whether convert would make tensor `name` as `typ` given imatrix entries for `have` (its rules)."""
    if typ not in ggml.NEEDS_IMATRIX or name in have:
        return True
    return name in ggml.IMATRIX_EXEMPT and typ not in ggml.ALWAYS_NEEDS_IMATRIX


def _file_type(groups: list[Group]) -> str:
    """The llama.cpp file type named in the metadata: that of the type holding the most weights."""
    by_type: dict[str, int] = {}
    for g in groups:
        by_type[g.type] = by_type.get(g.type, 0) + g.params
    top = max(by_type, key=lambda t: (by_type[t], -LADDER.index(t)))
    preset = _FILE_TYPE[top]
    assert preset in LLAMA_FTYPES
    return preset
