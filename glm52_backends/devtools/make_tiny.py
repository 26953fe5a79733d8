"""`glm52 make-tiny`: write small random checkpoints in the real GLM-5.2 format (HF `config.json` +
safetensors, BF16 or block-FP8, optionally sharded, optionally with the MTP layer) for demos and
tests, and quantized twins in msModelSlim's AscendV1 format (`quant="w8a8"` / `"w4a8"`, see
`ascendv1_tensors`). The model itself (config and random weights) is glm52_backends/tiny.py's.

`make_tiny_checkpoint` writes names, shapes, dtypes and config fields exactly as the real
`zai-org/GLM-5.2[-FP8]` checkpoint does (spec §1, §2, §10), only with tiny dimensions.

Writing is all or nothing and never replaces a file that is already there: every argument is
checked first, the whole checkpoint is written into a temporary folder beside the target and
then moved into place (one atomic rename when the target does not exist yet), so a refused or
killed run leaves the target as it was. The cached random checkpoint (`ensure_default_checkpoint`)
is rebuilt when a previous run was killed while making it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..files import atomic_path, umask
from ..loader import (ASCEND_DESCRIPTION, ASCEND_INDEX, ASCEND_NAMES, ASCEND_SINGLE, DEFAULT_FP8_BLOCK, INDEX_FILE,
                      SCALE_SUFFIX, SINGLE_FILE, ascend_part_name, recipe_format)
from ..tiny import tiny_config, tiny_tensors
from ..weights import Weight, quantize_weight

QUANT_CHOICES = ("fp8", "w8a8", "w4a8")   # make-tiny --quant


# ---- msModelSlim AscendV1 (W8A8 / W4A8) -------------------------------------------------------------

CALIBRATION_PROMPTS, CALIBRATION_LENGTH = 4, 24


def calibrate_static_inputs(cfg: ModelConfig, float_sd: dict[str, torch.Tensor], names: list[str], *,
                            seed: int = 0) -> dict[str, tuple[float, float]]:
    """(min, max) of the input of every linear in `names`, recorded while the float model (cpu_ref,
    float32) runs a few random prompts through every layer, the MTP layer included: what a static
    W8A8 calibration records for each projection (msModelSlim calibrates on a data set; here random
    token ids)."""
    from ..cache import PagedCache
    from ..model import Glm52Network
    from ..registry import get_backend

    ops = get_backend("cpu_ref")
    mtp = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in float_sd
    sd = {k: v.float() for k, v in float_sd.items()}
    net = Glm52Network(cfg, sd, ops, torch.device("cpu"), include_mtp=mtp)
    where = {}
    for i, L in enumerate(net.layers + ([net.mtp] if mtp else [])):
        p = f"model.layers.{i}.self_attn."
        where.update({id(L.wq_a): p + "q_a_proj.weight", id(L.wq_b): p + "q_b_proj.weight",
                      id(L.wkv_a): p + "kv_a_proj_with_mqa.weight", id(L.wo): p + "o_proj.weight"})
        if L.indexer is not None:
            where.update({id(L.indexer.wq_b): p + "indexer.wq_b.weight", id(L.indexer.wk): p + "indexer.wk.weight"})
    ranges: dict[str, tuple[float, float]] = {}
    linear = ops.linear

    def spy(x, w, *a, **k):
        n = where.get(id(w))
        if n is not None and x.numel():
            lo, hi = ranges.get(n, (math.inf, -math.inf))
            ranges[n] = (min(lo, float(x.min())), max(hi, float(x.max())))
        return linear(x, w, *a, **k)

    ops.linear = spy
    g = torch.Generator().manual_seed(seed + 7919)
    prompts = {r: torch.randint(0, cfg.vocab_size, (CALIBRATION_LENGTH,), generator=g).tolist()
               for r in range(CALIBRATION_PROMPTS)}
    cache = PagedCache(cfg, 2 * CALIBRATION_PROMPTS * (-(-CALIBRATION_LENGTH // 16)), 16, mtp=mtp)
    with torch.no_grad():
        _, h = net.run(cache, prompts)
        if mtp:            # the MTP layer: hidden i with token i+1, as in drafting
            net.run_mtp(cache, {("mtp", r): p[1:] + p[:1] for r, p in prompts.items()}, h)
    missing = [n for n in names if n not in ranges]
    if missing:
        raise RuntimeError(f"internal: calibration saw no input of {missing[:3]}")
    return {n: ranges[n] for n in names}


def static_input_params(lo: float, hi: float) -> tuple[float, float]:
    """(input_scale, input_offset) of asymmetric int8 over [lo, hi] (a 2.5 % margin each side):
    q = round(x / scale + offset) maps lo to about -128 and hi to about 127. The offset is never 0 (a
    one-step shift stays inside the margin), so the checkpoint's quant_bias is exercised."""
    span = max(hi - lo, 1e-6)
    lo, hi = lo - 0.025 * span, hi + 0.025 * span
    scale = (hi - lo) / 255.0
    offset = round(-128.0 - lo / scale)
    return scale, float(offset if offset != 0 else 1)


def ascendv1_tensors(cfg: ModelConfig, quant: str, *, seed: int, include_mtp: bool | None = None,
                     raw: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An msModelSlim AscendV1 checkpoint of the tiny random model: (tensors, quant_model_description).

    The GLM-5 mixed recipe (`loader.recipe_format`): attention projections W8A8 (static, calibrated
    by `calibrate_static_inputs` on the float model), dense MLP and experts W8A8_DYNAMIC (`quant="w4a8"`:
    routed experts W4A8_DYNAMIC), kv_b_proj, indexer wk / weights_proj, router and the rest FLOAT (BF16;
    router bias F32). Weights are quantized from the BF16 values with `weights.quantize_weight`
    (symmetric per channel, offset 0). msModelSlim's recipe also applies QuaRot rotation and smoothing
    before quantizing; that is NOT done here (these weights are random: nothing to rotate for).
    `raw`: the float checkpoint tensors to quantize instead (e.g. a trained model's)."""
    if quant not in ("w8a8", "w4a8"):
        raise ValueError(f"ascendv1_tensors: quant must be 'w8a8' or 'w4a8', got {quant!r}")
    if raw is None:
        raw = tiny_tensors(cfg, fp8=False, seed=seed, include_mtp=include_mtp)
    fmts = {n: recipe_format(n, quant) for n in raw}
    static = [n for n, f in fmts.items() if f == "w8a8_static"]
    params = {n: static_input_params(*r) for n, r in
              calibrate_static_inputs(cfg, raw, static, seed=seed).items()} if static else {}
    out: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {"model_quant_type": "W4A8_DYNAMIC" if quant == "w4a8" else "W8A8", "version": "1.0.0"}
    for name, t in raw.items():
        fmt = fmts[name]
        if fmt == "dense":
            out[name], desc[name] = t, "FLOAT"
            continue
        isc, ioff = params.get(name, (None, 0.0))
        w = quantize_weight(t.float(), fmt, input_scale=isc, input_offset=ioff)
        typ = ASCEND_NAMES[fmt]
        parts = {"data": w.data, "scales": w.scales[:, None], **w.aux}
        parts["offset"] = parts["offset"][:, None]
        if fmt == "w8a8_static":
            parts["input_scale"], parts["input_offset"] = parts["input_scale"].reshape(1), parts["input_offset"].reshape(1)
        if fmt == "w4a8_dynamic":
            parts["scale_bias"] = parts["scale_bias"][:, None]
        for part, v in parts.items():
            key = name if part == "data" else ascend_part_name(name, part)
            out[key], desc[key] = v.contiguous(), typ
    return out, desc


# ---- files -----------------------------------------------------------------------------------

def _owner(name: str) -> str:
    """The weight a stored tensor belongs to: itself, or the weight of an FP8 scale / AscendV1 aux tensor."""
    from ..loader.ascend import _ascend_owner
    if name.endswith(SCALE_SUFFIX):
        return name.removesuffix(SCALE_SUFFIX)
    owner = _ascend_owner(name)
    return owner[0] if owner is not None else name


def _shard_names(names: list[str], shards: int) -> list[list[str]]:
    """Split names into `shards` contiguous groups, a weight and its scales / aux tensors kept together."""
    by: dict[str, list[str]] = {}
    have = set(names)
    for n in names:
        by.setdefault(_owner(n) if _owner(n) in have else n, []).append(n)
    groups = [sorted(g, key=lambda n: n != w) for w, g in by.items()]      # the weight first
    if shards > len(groups):
        raise ValueError(f"shards={shards} exceeds the number of weights ({len(groups)})")
    per = -(-len(groups) // shards)
    return [sum(groups[k * per:(k + 1) * per], []) for k in range(shards) if groups[k * per:(k + 1) * per]]


_umask = umask
_atomic = atomic_path   # one helper for every file the package writes (files.py)


def _write_json(file: str, d: dict) -> None:
    with _atomic(file) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], shards: int = 1, *, ascend: bool = False) -> None:
    """`model.safetensors`, or `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`
    (the index last); `ascend=True`: the AscendV1 names (`quant_model_weights.safetensors`,
    `quant_model_weights-0000k-of-0000N.safetensors` + `quant_model_weights.safetensors.index.json`).
    Each file is written under a temporary name and renamed into place."""
    meta = {"format": "pt"}
    single, index, stem = (ASCEND_SINGLE, ASCEND_INDEX, "quant_model_weights") if ascend else \
        (SINGLE_FILE, INDEX_FILE, "model")
    if shards <= 1:
        with _atomic(os.path.join(path, single)) as tmp:
            save_file(tensors, tmp, metadata=meta)
        return
    groups = _shard_names(list(tensors), shards)
    weight_map, total = {}, 0
    for k, names in enumerate(groups, start=1):
        fname = f"{stem}-{k:05d}-of-{len(groups):05d}.safetensors"
        with _atomic(os.path.join(path, fname)) as tmp:
            save_file({n: tensors[n] for n in names}, tmp, metadata=meta)
        for n in names:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    _write_json(os.path.join(path, index), {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_config(path: str, d: dict) -> None:
    _write_json(os.path.join(path, "config.json"), d)


# ---- all-or-nothing checkpoint folders -----------------------------------------------------------

def _ours(name: str) -> bool:
    """A file name a checkpoint writer here produces (what make-tiny refuses to replace)."""
    return name in ("config.json", "tokenizer.json", INDEX_FILE, ASCEND_DESCRIPTION, ASCEND_INDEX) or \
        (name.startswith(("model", "quant_model_weight")) and name.endswith(".safetensors"))


def _refuse_existing(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a folder")
    if os.path.isdir(path):
        clash = sorted(n for n in os.listdir(path) if _ours(n))
        if clash:
            raise FileExistsError(f"{path} already holds {', '.join(clash)}; nothing was written (files are never "
                                  f"replaced: choose a new or empty folder, or remove them first)")


def _check_writable(path: str) -> str:
    """The existing folder the checkpoint folder will be created in (or `path` itself)."""
    parent = os.path.dirname(os.path.abspath(path))
    probe = path if os.path.isdir(path) else parent
    while not os.path.exists(probe):  # os.makedirs will create the missing parents
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write a checkpoint to {path}: {probe} is not a writable folder")
    return parent


@contextlib.contextmanager
def _staged(path: str):
    """Yield a temporary folder beside `path`; on success its files end up in `path`: the folder is
    renamed (atomic) when `path` does not exist, else each file is moved in (refusing any clash);
    on failure (an exception, Ctrl-C) the temporary folder is removed and `path` is untouched."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(path)) + ".partial-")
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; os.makedirs would not
    try:
        yield tmp
        try:
            os.rename(tmp, path)  # atomic; fails if `path` exists (non-empty) or on some systems at all
            return
        except OSError:
            if not os.path.isdir(path):
                raise
        _refuse_existing(path)  # another writer may have come first
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")  # config.json last
        for n in names:
            if os.path.exists(os.path.join(path, n)):
                raise FileExistsError(f"{os.path.join(path, n)} appeared while writing; it was left as it is")
            os.replace(os.path.join(tmp, n), os.path.join(path, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_tiny_checkpoint(path: str | os.PathLike, *, fp8: bool = False, mtp: bool = False, layers: int = 4,
                         seed: int = 0, shards: int = 1, vocab_size: int = 256, index_topk: int = 8,
                         quant: str | None = None, **overrides) -> str:
    """Write a random GLM-5.2-format checkpoint to folder `path` (created) and return its path.

    `quant="fp8"` (or `fp8=True`): block-FP8 weights (`weight_block_size` from `fp8_block=(b0, b1)`,
    default 128). `quant="w8a8"` / `"w4a8"`: an msModelSlim AscendV1 folder of the same random model
    (`quant_model_description.json` + `quant_model_weights*.safetensors` + the HF config.json; the
    GLM-5 mixed recipe, static attention calibrated on the float model, no QuaRot: `ascendv1_tensors`).
    Every format quantizes the BF16 values the plain checkpoint of the same seed stores.
    `mtp=True`: `num_nextn_predict_layers=1` and layer `layers` (the MTP layer) is written.
    `shards>1`: a sharded set with `model.safetensors.index.json`. Also writes a byte-level
    `tokenizer.json` when `vocab_size >= 256` and the `tokenizers` package is installed.
    Refuses (before writing anything) a folder that already holds a config.json, tokenizer.json
    or safetensors file; a failure part-way leaves `path` as it was.
    """
    path = os.fspath(path)
    for name, v in (("layers", layers), ("vocab_size", vocab_size), ("index_topk", index_topk),
                    ("shards", shards)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"make_tiny_checkpoint: {name} must be a positive integer, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"make_tiny_checkpoint: seed must be an integer, got {seed!r}")
    if quant is not None and quant not in QUANT_CHOICES:
        raise ValueError(f"make_tiny_checkpoint: quant must be one of {', '.join(QUANT_CHOICES)} (or None), "
                         f"got {quant!r}")
    if fp8 and quant not in (None, "fp8"):
        raise ValueError(f"make_tiny_checkpoint: fp8=True and quant={quant!r} contradict each other")
    fp8 = fp8 or quant == "fp8"
    ascend = quant in ("w8a8", "w4a8")
    cfg, cfg_dict = tiny_config(fp8=fp8, mtp=mtp, layers=layers, vocab_size=vocab_size,
                                index_topk=index_topk, **overrides)
    desc = None
    if ascend:
        tensors, desc = ascendv1_tensors(cfg, quant, seed=seed)
    else:
        tensors = tiny_tensors(cfg, fp8=fp8, seed=seed)
    if shards > 1:
        _shard_names(list(tensors), shards)  # refuses too many shards before anything is written
    _refuse_existing(path)
    _check_writable(path)
    with _staged(path) as tmp:
        write_safetensors(tmp, tensors, shards, ascend=ascend)
        if desc is not None:
            _write_json(os.path.join(tmp, ASCEND_DESCRIPTION), desc)
        write_tiny_tokenizer(tmp, cfg.vocab_size)
        _write_config(tmp, cfg_dict)
    return path


# ---- dequantised twin ------------------------------------------------------------------------

def _read_raw(path: str) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint folder, as stored (no validation, no conversion)."""
    from safetensors import safe_open
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        files = [os.path.join(path, SINGLE_FILE)]
    else:
        with open(index, encoding="utf-8") as f:
            files = [os.path.join(path, s) for s in dict.fromkeys(json.load(f)["weight_map"].values())]
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def dequantized_twin(path_fp8: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """Write the unquantised twin of an FP8 checkpoint: every FP8 weight dequantised to F32 (exact),
    scales dropped, every other tensor copied as stored, no `quantization_config`. Returns out_path."""
    src, dst = os.fspath(path_fp8), os.fspath(out_path)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        d = json.load(f)
    q = d.pop("quantization_config", None) or {}
    block = tuple(q.get("weight_block_size", DEFAULT_FP8_BLOCK))
    raw = _read_raw(src)
    out = {}
    for name, t in raw.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        out[name] = Weight(t, raw[name + SCALE_SUFFIX], "fp8_block", block).dense() \
            if t.dtype == torch.float8_e4m3fn else t
    _refuse_existing(dst)
    _check_writable(dst)
    with _staged(dst) as tmp:
        write_safetensors(tmp, out)
        if os.path.isfile(os.path.join(src, "tokenizer.json")):
            shutil.copyfile(os.path.join(src, "tokenizer.json"), os.path.join(tmp, "tokenizer.json"))
        _write_config(tmp, d)
    return dst


# ---- tokenizer -------------------------------------------------------------------------------

EOS_TOKEN = "<|endoftext|>"


def _byte_chars() -> list[str]:
    """The printable stand-in character of each byte 0..255 (the GPT-2 byte-level alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_tokenizer(path: str, vocab_size: int) -> bool:
    """Byte-level `tokenizer.json`: ids 0..254 = bytes 0x00..0xFE (0xFF never occurs in UTF-8),
    ids 255..V-2 reserved, id V-1 = `<|endoftext|>` (the tiny eos). False if not written."""
    if vocab_size < 256:
        return False
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return False
    vocab = {c: i for i, c in enumerate(_byte_chars()[:255])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [f"<|reserved_{i}|>" for i in range(vocab_size - 256)] + [EOS_TOKEN]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    with _atomic(os.path.join(path, "tokenizer.json")) as tmp:
        tok.save(tmp)
    return True


# ---- the cached random checkpoint ---------------------------------------------------------------

def tiny_default_dir() -> str:
    """Where the embedded default checkpoint lives: $GLM52_CACHE/tiny-default (default ~/.cache/glm52_backends)."""
    root = os.environ.get("GLM52_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "glm52_backends"))
    return os.path.join(root, "tiny-default")


DEFAULT_TINY = tiny_default_dir()


def _default_is_whole(path: str) -> str | None:
    """None when the folder holds a readable checkpoint (headers checked, no tensor read); else why not."""
    from ..loader.ascend import _description
    from ..loader.layout import _weight_files, load_config
    from ..loader.validation import _resolve_mtp, validate_entries
    try:
        cfg = load_config(path)
        entries, where = _weight_files(path)
        # with the AscendV1 description when there is one: an msModelSlim folder is whole, never rebuilt
        validate_entries(cfg, entries, where, include_mtp=_resolve_mtp(cfg, entries, where, None),
                         desc=_description(path))
    except (ValueError, OSError) as e:
        return str(e).splitlines()[0]
    return None


def ensure_default_checkpoint(path: str | None = None) -> str:
    """A cached tiny random checkpoint in the real format (tests and demos that want random
    weights; the embedded default model is `glm52_backends.default_checkpoint()`), made once
    (atomically: it appears whole or not at all). A folder left broken by a killed run is rebuilt."""
    import sys
    path = os.fspath(path or DEFAULT_TINY)
    if os.path.isdir(path):
        why = _default_is_whole(path)
        if why is None:
            return path
        stray = sorted(n for n in os.listdir(path) if not _ours(n))
        if stray:  # not only what we write there: never delete someone's files
            raise FileExistsError(f"the embedded default checkpoint at {path} is broken ({why}) and also holds "
                                  f"{', '.join(stray[:5])}; remove the folder or set GLM52_CACHE elsewhere")
        print(f"the embedded tiny checkpoint at {path} is incomplete ({why}); rebuilding it", file=sys.stderr)
        shutil.rmtree(path)
    print(f"making the embedded tiny checkpoint at {path}", file=sys.stderr)
    try:
        make_tiny_checkpoint(path, mtp=True, layers=4, seed=0)
    except FileExistsError:  # another process made it meanwhile
        if _default_is_whole(path) is not None:
            raise
    return path


__all__ = ["make_tiny_checkpoint", "dequantized_twin", "ensure_default_checkpoint",
           "write_safetensors", "write_tiny_tokenizer", "ascendv1_tensors", "calibrate_static_inputs", "QUANT_CHOICES"]
