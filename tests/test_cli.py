"""The `glm52` command line: backends, make-tiny, generate (tables and JSON), errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from glm52_backends.cli import main
from glm52_backends.loader import load_checkpoint


def test_backends_table(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("cpu_ref"))
    assert "yes" in row and "10/10" in row and "indexer_topk" in row
    assert "cuda" in out and "auto" in out


def test_make_tiny_then_generate(tmp_path, capsys):
    ckpt = str(tmp_path / "ck")
    assert main(["make-tiny", ckpt, "--mtp", "--layers", "2", "--fp8"]) == 0
    cfg, tensors = load_checkpoint(ckpt, progress=False)
    assert cfg.num_hidden_layers == 2 and cfg.fp8_block == (128, 128) and cfg.mtp_layer == 2
    capsys.readouterr()
    assert main(["generate", ckpt, "--backend", "cpu_ref", "--batch", "2", "--max-new-tokens", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "backend    : cpu_ref" in out and "native ops : " in out and "tok/s" in out
    assert "generated token ids" in out
    assert main(["generate", ckpt, "--backend", "cpu_ref", "--batch", "2", "--max-new-tokens", "3", "--quiet",
                 "--json", "--ids", "1,2,3", "--ignore-eos"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [len(t) for t in d["tokens"]] == [3, 3] and d["tokens"][0] == d["tokens"][1]  # same prompt, greedy
    assert d["stats"]["backend"] == "cpu_ref" and d["stats"]["ops"]["sparse_mla"] == "native"


def test_make_tiny_quant_writes_each_format(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "w4"), "--quant", "w4a8", "--layers", "2"]) == 0
    assert "msModelSlim AscendV1 W4A8" in capsys.readouterr().out
    assert {"quant_model_description.json", "quant_model_weights.safetensors", "config.json"} <= \
        set(os.listdir(tmp_path / "w4"))
    _, sd = load_checkpoint(str(tmp_path / "w4"), progress=False)
    assert sd["model.layers.1.mlp.experts.0.up_proj.weight"].format == "w4a8_dynamic"
    assert sd["model.layers.1.self_attn.o_proj.weight"].format == "w8a8_static"
    assert main(["make-tiny", str(tmp_path / "f8"), "--quant", "fp8", "--layers", "2", "--shards", "2"]) == 0
    a = load_checkpoint(str(tmp_path / "f8"), progress=False)[1]["model.layers.0.mlp.down_proj.weight"]
    assert main(["make-tiny", str(tmp_path / "alias"), "--fp8", "--layers", "2"]) == 0      # --fp8 = --quant fp8
    b = load_checkpoint(str(tmp_path / "alias"), progress=False)[1]["model.layers.0.mlp.down_proj.weight"]
    assert a.format == b.format == "fp8_block" and torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    capsys.readouterr()
    assert main(["make-tiny", str(tmp_path / "x"), "--fp8", "--quant", "w8a8"]) == 2
    assert "--fp8 is an alias of --quant fp8" in capsys.readouterr().err and not os.path.exists(tmp_path / "x")


def test_generate_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing-here"), "--backend", "cpu_ref", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glm52 generate: error:") and "config.json" in err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--dtype", "float8"])
    assert e.value.code == 2 and "argument --dtype: unknown dtype 'float8'" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2  # no command is bad input (exit 1 means a check failed)
    assert "generate" in capsys.readouterr().out


def test_prompt_file_is_the_prompt_and_a_deployment_chunks_by_its_step_budget(tmp_path, capsys, monkeypatch):
    """`--prompt-file` generates what `--prompt` does with the file's text; a missing file is named. With
    `--deployment` and no `--prefill-chunk` the prompt is chunked by the YAML's max_batched_tokens."""
    f = tmp_path / "prompt.txt"
    f.write_text("def add(a, b):\n    return", encoding="utf-8")
    base = ["generate", "--backend", "torch", "--batch", "1", "--max-new-tokens", "4", "--quiet", "--json"]
    assert main(base + ["--prompt", f.read_text(encoding="utf-8")]) == 0
    want = json.loads(capsys.readouterr().out)["tokens"]
    assert main(base + ["--prompt-file", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want
    with pytest.raises(SystemExit) as e:
        main(base + ["--prompt-file", str(tmp_path / "absent.txt")])
    assert e.value.code == 2 and "absent.txt" in capsys.readouterr().err
    from glm52_backends import GLM52
    seen = []
    real = GLM52.generate

    def spy(self, *a, prefill_chunk=None, **k):
        seen.append(prefill_chunk)
        return real(self, *a, prefill_chunk=prefill_chunk, **k)
    monkeypatch.setattr(GLM52, "generate", spy)
    assert main(base + ["--prompt-file", str(f), "--deployment", "cpu-tiny"]) == 0
    from glm52_backends.deploy import load_deployment
    assert seen == [load_deployment("cpu-tiny").max_batched_tokens]
    assert json.loads(capsys.readouterr().out)["tokens"] == want
