"""`align convert` and `align run --port converted`: the conversion report, the rewrite rules,
the generated ports aligned end to end, and injected bugs in generated code found and localized.

The end-to-end tests run PaConvert from .venv-paconvert (`make venv-paconvert`; .ci/run creates
it). They work in a copy of the registry under tmp_path, so build/ and reports/ stay clean.
"""

import json
import os
import shutil

import pytest
from conftest import ROOT

from align.convert.paconvert import parse_log
from align.convert.rewrite import Leftover, rewrite, runtime_names

PACONVERT = ROOT / ".venv-paconvert" / "bin" / "paconvert"
# .ci/run sets this: there a missing PaConvert fails the tests instead of skipping them.
REQUIRED = os.environ.get("ALIGN_REQUIRE_PACONVERT") == "1"
needs_paconvert = pytest.mark.skipif(
    not PACONVERT.is_file() and not REQUIRED,
    reason=f"PaConvert is not installed at {PACONVERT}; create it with `make venv-paconvert`")


def test_paconvert_is_installed_where_ci_requires_it():
    if not REQUIRED:
        pytest.skip("only checked where ALIGN_REQUIRE_PACONVERT=1 (.ci/run)")
    assert PACONVERT.is_file(), f"{PACONVERT} is missing; `make venv-paconvert` should have created it"


# --- the log parser and the rules, on text (no PaConvert needed) ----------------------------

LOG = """\
[m.py:5] [Success] Convert torch.nn.Module to Paddle
[m.py:9] [Success] Convert Class Method: torch.Tensor.pow to Paddle
[m.py:9] [Not Support] convert torch.nn.Buffer to Paddle is not supported currently
[m.py:12] [Success] Convert torch.nn.Linear to Paddle
[m.py:14] [Success] Convert torch.nn.Linear to Paddle
torch.nn.Linear          paddle.compat.nn.Linear          2
torch.nn.Module          paddle.nn.Module                 1
torch.Tensor.pow         paddle.Tensor.pow                1
There are 5 Pytorch APIs in this Project:
 4  Pytorch APIs have been converted to Paddle successfully!
"""


def test_parse_log_counts_uses_by_name_with_lines():
    converted, unconverted, total, done = parse_log(LOG)
    assert (total, done) == (5, 4)
    assert [(u.name, u.count, u.paddle, u.lines) for u in converted] == [
        ("torch.nn.Linear", 2, "paddle.compat.nn.Linear", (12, 14)),
        ("torch.Tensor.pow", 1, "paddle.Tensor.pow", (9,)),
        ("torch.nn.Module", 1, "paddle.nn.Module", (5,))]
    assert [(u.name, u.count, u.paddle) for u in unconverted] == [("torch.nn.Buffer", 1, None)]


def test_parse_log_refuses_a_log_whose_summary_disagrees():
    with pytest.raises(ValueError, match="does not add up: summary 4/6"):
        parse_log(LOG.replace("There are 5", "There are 6"))


DRAFT = '''\
import paddle

from ...activations import ACT2FN
from ...utils import auto_docstring, NoSuchThing
from .configuration_tiny import TinyConfig


def _Tensor_split(self, split_size, dim=0):
    return paddle.split(self, split_size, dim)

setattr(paddle.Tensor, "split", _Tensor_split)


class Rotary(paddle.nn.Module):
    def __init__(self, inv_freq, names):
        super().__init__()
>>>>>>        self.inv_freq = torch.nn.Buffer(inv_freq, persistent=False)
        for name in names:
            setattr(
                self,
                f"{name}_inv_freq",
>>>>>>                torch.nn.Buffer(inv_freq.clone(), persistent=False),
            )
        self.embed = paddle.nn.Embedding(10, 4, padding_idx=0)
        self.loss = paddle.nn.CrossEntropyLoss()

    def forward(self, x):
        if torch.jit.is_tracing():
            pass
        a, b = x.split(1, dim=-1)
        return torch.sigmoid(a)
'''


@pytest.fixture
def rewritten():
    return rewrite(DRAFT, "transformers.models.tiny.modeling_tiny", runtime_names(), header="# generated\n")


def test_rules_rewrite_imports_buffers_embeddings_losses_and_tracing(rewritten):
    code, rewrites, _ = rewritten
    rules = [(r.rule, r.line) for r in rewrites]
    assert ("import-runtime", 3) in rules and ("import-runtime", 4) in rules
    assert ("import-transformers", 5) in rules and ("no-global-patch", 11) in rules
    assert ("buffer", 17) in rules and ("buffer", 19) in rules
    assert ("embedding", 24) in rules and ("cross-entropy", 25) in rules and ("jit-tracing", 28) in rules
    assert "from align.convert.hf_runtime import ACT2FN" in code
    assert "from transformers.models.tiny.configuration_tiny import TinyConfig" in code
    assert 'self.register_buffer("inv_freq", inv_freq, persistable=False)' in code
    assert 'self.register_buffer(f"{name}_inv_freq", inv_freq.clone(), persistable=False)' in code
    assert "self.embed = hf_runtime.Embedding(10, 4, padding_idx=0)" in code
    assert "hf_runtime.CrossEntropyLoss()" in code and "if False:" in code
    assert not any(line.lstrip().startswith(("setattr(paddle.Tensor", ">>>>>>")) for line in code.splitlines())
    # Every rewrite names its reason.
    assert all(r.why for r in rewrites)


def test_what_no_rule_handles_is_left_for_a_human_at_the_generated_line(rewritten):
    code, _, leftovers = rewritten
    lines = code.splitlines()
    by_why = {x.why.split(" ")[0]: x for x in leftovers}
    assert set(by_why) == {"align's", "calls", "still"}
    for x in leftovers:
        assert isinstance(x, Leftover) and x.line > 0
    assert "NoSuchThing" in lines[by_why["align's"].line - 1]  # the runtime lacks it
    assert "x.split(1, dim=-1)" in lines[by_why["calls"].line - 1]  # relied on PaConvert's global patch
    assert "torch.sigmoid" in lines[by_why["still"].line - 1]


def test_the_runtime_names_every_symbol_the_target_models_import():
    names = runtime_names()
    for name in ("PreTrainedModel", "ACT2FN", "create_causal_mask", "create_bidirectional_sliding_window_mask",
                 "ALL_ATTENTION_FUNCTIONS", "ROPE_INIT_FUNCTIONS", "dynamic_rope_update", "MaskedLMOutput",
                 "can_return_tuple", "initialization", "GradientCheckpointingLayer", "slice_logits_to_keep",
                 "OutputRecorder", "BackboneMixin", "torch_int"):
        assert name in names


# --- registry and command-line errors --------------------------------------------------------

@pytest.fixture
def registry(tmp_path):
    """A copy of the registry and weight rules: build/ and reports/ are written under tmp_path."""
    shutil.copy(ROOT / "align.toml", tmp_path / "align.toml")
    shutil.copytree(ROOT / "weights", tmp_path / "weights")
    return tmp_path


def _cli(registry, *args, capsys):
    from align.cli import main

    code = main(["--registry", str(registry / "align.toml"), *args])
    return code, capsys.readouterr().err


def test_run_before_convert_says_to_convert_first(registry, capsys):
    code, err = _cli(registry, "run", "gemma2", "--port", "converted", "--quiet", capsys=capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"align: error: {registry / 'align.toml'}: models.gemma2.ports.converted: no generated port at "
        "build/converted/gemma2/modeling_gemma2.py; run `align convert gemma2` first"]


def test_a_model_without_a_hand_port_refuses_port_hand(registry, capsys):
    code, err = _cli(registry, "run", "deberta_v2", "--port", "hand", "--quiet", capsys=capsys)
    assert code == 2 and "models.deberta_v2.port: deberta_v2 has no hand port (known: converted)" in err


def test_a_port_the_model_does_not_declare_is_refused(registry, capsys):
    code, err = _cli(registry, "run", "minilm", "--port", "converted", "--quiet", capsys=capsys)
    assert code == 2 and "models.minilm.ports.converted: no such port for minilm (known: hand)" in err


def test_convert_without_paconvert_says_how_to_install_it(registry, capsys):
    code, err = _cli(registry, "convert", "gemma2", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "PaConvert is not installed here; create it with `make venv-paconvert`" in err


@pytest.mark.parametrize("table,message", [
    ('[models.gemma2.ports.converted]\nsource = "transformers.models.gemma2.modeling_gemma2"\nclass = "X"\n'
     'weights = "weights/gemma2-converted.toml"\ncolour = "red"\n', "models.gemma2.ports.converted.colour: unknown key"),
    ('[models.gemma2.ports.handmade]\nsource = "a.b"\n', "models.gemma2.ports.handmade: unknown port variant"),
    ('[models.gemma2.ports.converted]\nsource = "modeling_gemma2"\nclass = "X"\nweights = "weights/gemma2.toml"\n',
     "models.gemma2.ports.converted.source: expected a dotted module name"),
])
def test_port_tables_are_checked_like_the_rest_of_the_registry(registry, capsys, table, message):
    text = (registry / "align.toml").read_text()
    start = text.index("[models.gemma2.ports.converted]")
    end = text.index("[models.gemma2.init]")
    (registry / "align.toml").write_text(text[:start] + table + "\n" + text[end:])
    code, err = _cli(registry, "list", capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# --- end to end: convert, align, break ---------------------------------------------------------

def _convert(registry, model, capsys):
    code, err = _cli(registry, "convert", model, "--paconvert", str(PACONVERT), capsys=capsys)
    assert code == 0, err
    return json.loads((registry / "build" / "converted" / model / "conversion.json").read_text()), err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The six models converted once per module (PaConvert takes about a second each)."""
    from align.cli import main

    root = tmp_path_factory.mktemp("converted")
    shutil.copy(ROOT / "align.toml", root / "align.toml")
    shutil.copytree(ROOT / "weights", root / "weights")
    for model in ("gemma2", "phi3", "modernbert", "deberta_v2", "swin", "clip"):
        assert main(["--registry", str(root / "align.toml"), "convert", model, "--paconvert", str(PACONVERT)]) == 0
    return root


@pytest.fixture
def converted_copy(converted, tmp_path):
    """A private copy of the converted registry, for a test that breaks the generated code."""
    shutil.copytree(converted, tmp_path / "registry")
    return tmp_path / "registry"


def _run(registry, model, capsys, *extra):
    out = registry / "out"
    code, err = _cli(registry, "run", model, "--port", "converted", "--dtype", "fp32", "--out", str(out), "--quiet",
                     *extra, capsys=capsys)
    path = out / "report.json"
    return code, (json.loads(path.read_text()) if path.exists() else None), err


def _edit(registry, model, old, new):
    """Break the generated port for one test: only this tmp copy's code changes."""
    path = next((registry / "build" / "converted" / model).glob("modeling_*.py"))
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} is not in the generated {path.name}"
    path.write_text(text.replace(old, new))


@needs_paconvert
@pytest.mark.parametrize("model,unconverted", [("gemma2", {"torch.nn.Buffer": 3}), ("phi3", {"torch.nn.Buffer": 2}),
                                               ("modernbert", {"torch.nn.Buffer": 2}),
                                               ("deberta_v2", {"torch.nn.Buffer": 1}),
                                               ("swin", {"torch.nn.Buffer": 1, "torch.jit.is_tracing": 2}),
                                               ("clip", {"torch.nn.Buffer": 2, "torch.jit.is_tracing": 1})])
def test_converted_port_aligns_forward_and_backward(registry, capsys, model, unconverted, bug_ledger):
    meta, err = _convert(registry, model, capsys)
    uses = meta["api_uses"]
    assert uses["total"] == uses["converted"] + sum(unconverted.values())
    assert {u["name"]: u["count"] for u in meta["unconverted"]} == unconverted
    assert f"{uses['converted']}/{uses['total']} torch API uses converted" in err
    rules = {r["rule"] for r in meta["rewrites"]}
    assert {"buffer", "import-runtime"} <= rules and ("embedding" in rules) == (model != "swin")
    assert not (registry / "all_api_map.xlsx").exists() and not (ROOT / "all_api_map.xlsx").exists()

    code, report, err = _run(registry, model, capsys)
    bug_ledger.record_clean(f"{model} converted port", code != 0)
    assert code == 0, err
    assert report["verdict"] == "pass" and report["port"].startswith(f"align_converted.{model}:")
    fp32 = {r["mode"]: r for r in report["runs"] if r["dtype"] == "float32"}
    assert set(fp32) == {"teacher_forced", "free_running"} and report["unpaired"] == []
    assert all(layer["passed"] for layer in fp32["teacher_forced"]["layers"])
    assert report["param_grads"] and all(p["passed"] for p in report["param_grads"])
    # paddle.compat.nn.Linear keeps torch's layout: no linear weight is transposed.
    assert {w["transform"] for w in report["weights"]} <= {"copy", "tied"}


@needs_paconvert
@pytest.mark.parametrize("model,old,new,direction,culprit", [
    # The generated code itself, broken in one place.
    ("gemma2", "output = output * (1.0 + self.weight.float())", "output = output * self.weight.float()",
     "forward", "model.layers.0.input_layernorm"),
    ("gemma2", "attn_weights = attn_weights * softcap", "attn_weights = attn_weights * softcap * 1.01",
     "forward", "model.layers.0.self_attn"),
    ("phi3", "create_causal_mask\n            if self.config.sliding_window is None",
     "create_causal_mask\n            if True", "forward", "model"),
    ("modernbert", "return self.Wo(self.drop(self.act(input) * gate))",
     "return self.Wo(self.drop(input * self.act(gate)))", "forward", "model.layers.0.mlp"),
    ("deberta_v2", "score += c2p_att / scale.to(dtype=c2p_att.dtype)", "score += c2p_att / scale.to(dtype=c2p_att.dtype) / 2",
     "forward", "deberta.encoder.layer.0.attention.self"),
    ("clip", "image_loss = contrastive_loss(similarity.T)", "image_loss = contrastive_loss(similarity)",
     "forward", "<root>"),
    ("swin", "direction = 1 if reverse else -1", "direction = -1 if reverse else 1",
     "forward", "swin.encoder.layers.0.blocks.1"),
    # One of align's rules taken back: paddle's Embedding zeroes the pad row.
    ("gemma2", "class Gemma2TextScaledWordEmbedding(hf_runtime.Embedding)",
     "class Gemma2TextScaledWordEmbedding(paddle.nn.Embedding)", "forward", "model.embed_tokens"),
    ("phi3", "self.embed_tokens = hf_runtime.Embedding(", "self.embed_tokens = paddle.nn.Embedding(",
     "forward", "model.embed_tokens"),
    # ... and paddle's CrossEntropyLoss, which DeBERTa's masked-LM head calls directly: its mean
    # divides by all 32 tokens, not the masked ones. The loss lives in the root's forward.
    ("deberta_v2", "loss_fct = hf_runtime.CrossEntropyLoss()\n            masked_lm_loss",
     "loss_fct = paddle.nn.CrossEntropyLoss()\n            masked_lm_loss", "forward", "<root>"),
])
def test_a_bug_in_generated_code_fails_and_is_localized(converted_copy, capsys, bug_ledger, model, old, new,
                                                        direction, culprit):
    registry = converted_copy
    _edit(registry, model, old, new)
    code, report, err = _run(registry, model, capsys)
    culprits = report["culprits"][direction] if report else []
    bug_ledger.record(f"converted {model}: {new.strip()[:50]}", "converted port", code == 1, culprit in culprits)
    assert code == 1 and report["verdict"] == "fail"
    assert culprit in culprits, culprits


@needs_paconvert
def test_paddles_cross_entropy_in_the_runtime_would_fail_at_the_root(converted, capsys, bug_ledger, monkeypatch):
    import paddle

    from align.convert.hf_runtime import losses

    def paddle_mean(logits, labels, vocab_size, **kwargs):  # what a converted loss gives without the fix
        shifted = paddle.concat([labels[:, 1:], paddle.full([labels.shape[0], 1], -100, dtype=labels.dtype)], axis=1)
        return paddle.nn.functional.cross_entropy(logits.astype("float32").reshape([-1, vocab_size]),
                                                  shifted.reshape([-1]), ignore_index=-100, reduction="mean")

    monkeypatch.setitem(losses.LOSS_MAPPING, "ForCausalLM", paddle_mean)
    code, report, _ = _run(converted, "gemma2", capsys)
    culprits = report["culprits"]["forward"] + report["culprits"]["backward"]
    bug_ledger.record("converted gemma2: paddle's cross_entropy mean", "converted port", code == 1, "<root>" in culprits)
    assert code == 1 and "<root>" in culprits
    loss = next(o for o in report["outputs"] if o["name"] == "loss")
    assert not loss["passed"]


# --- two ports, one reference ------------------------------------------------------------------

@needs_paconvert
def test_hand_and_converted_side_by_side_against_one_reference(converted_copy, capsys, bug_ledger):
    registry = converted_copy
    _edit(registry, "gemma2", "output = output * (1.0 + self.weight.float())", "output = output * self.weight.float()")
    out = registry / "reports"
    code, err = _cli(registry, "run", "gemma2", "--port", "hand", "--port", "converted", "--dtype", "fp32",
                     "--out", str(out), "--quiet", capsys=capsys)
    assert code == 1  # one of the two ports is not aligned
    hand = json.loads((out / "gemma2" / "report.json").read_text())
    conv = json.loads((out / "gemma2-converted" / "report.json").read_text())
    assert hand["verdict"] == "pass" and conv["verdict"] == "fail"
    assert hand["port"] == "ports.text.gemma2:Gemma2ForCausalLM" and conv["port"].startswith("align_converted.gemma2:")
    assert "model.layers.0.input_layernorm" in conv["culprits"]["forward"]
    # The failure message reruns the right port.
    assert (f"Rerun: align --registry {registry / 'align.toml'} run gemma2 --port converted --dtype float32 "
            "--only model.layers.0.input_layernorm") in err

    from align.report import side_by_side

    rows = {r.module: r for r in side_by_side.rows({"hand": hand, "converted": conv})}
    norm = rows["model.layers.0.input_layernorm"]
    assert norm.cells["hand"].passed and not norm.cells["converted"].passed
    assert norm.cells["converted"].forward > 1e-3 > norm.cells["hand"].forward
    assert len(rows) == len(hand["runs"][0]["layers"])
    page = (out / "gemma2-ports.html").read_text()
    assert '<a href="gemma2/report.html">hand</a>' in page and '<a href="gemma2-converted/report.html">converted</a>' in page
    assert "model.layers.0.input_layernorm" in page and page.count('class="num bad"') >= 2
    assert "per module, teacher-forced max abs" in err and "gemma2: 2 ports against one reference" in err
    # The dashboard keeps one row per port, each linking its own report.
    index = (out / "index.html").read_text()
    assert 'href="gemma2/report.html"' in index and 'href="gemma2-converted/report.html"' in index
    bug_ledger.record("converted gemma2 side by side: RMSNorm without 1 +", "converted port", code == 1,
                      "model.layers.0.input_layernorm" in conv["culprits"]["forward"])


# --- beyond transformers: a package's own modules followed and converted with it ----------------

@needs_paconvert
def test_a_module_of_another_package_is_converted_with_the_modules_it_imports(registry, capsys):
    """auraloss.freq imports auraloss.utils and auraloss.perceptual, which run torch code: they
    are converted with it into one generated package, counted in the rate, and the report
    names auraloss, not transformers. What the draft then gets wrong, align says where."""
    meta, err = _convert(registry, "mrstft", capsys)
    assert meta["reference_package"] == "auraloss"
    assert [m["module"] for m in meta["modules"]] == ["auraloss.freq", "auraloss.utils", "auraloss.perceptual"]
    assert meta["api_uses"]["total"] == sum(m["total_uses"] for m in meta["modules"])
    assert "from auraloss.freq (auraloss, installed)" in (registry / "build" / "converted" / "mrstft" / "freq.py").read_text()
    rules = {(r["rule"], r["after"]) for r in meta["rewrites"]}
    assert ("import-converted", "from .utils import apply_reduction") in rules
    assert ("import-auraloss", "from auraloss.plotting import compare_filters") in rules  # no torch: reused
    assert any(rule == "torch-by-name" for rule, _ in rules) and meta["leftovers"] == []
    assert "converted with it: auraloss.perceptual -> perceptual.py" in err

    code, report, _ = _run(registry, "mrstft", capsys)
    # The draft keeps torch.norm as Paddle's float32 linalg.norm, whose sum drifts where
    # torch's does not: the spectral convergence of each resolution, and only it, is off.
    culprits = report["culprits"]["forward"]
    assert code == 1 and culprits == [f"stft_losses.{i}.spectralconv" for i in range(3)]
    assert report["input_grads"][0]["name"] == "input:x"


def test_an_import_of_another_torch_package_is_a_use_left_unconverted():
    draft = "import paddle\nimport auraloss.time\nfrom auraloss.freq import STFTLoss\n\nclass M(paddle.nn.Layer):\n    pass\n"
    code, _, leftovers = rewrite(draft, "mypkg.model", runtime_names())
    assert [(x.imports, x.why.split(",")[0]) for x in leftovers] == [
        ("auraloss.time", "imports auraloss.time"), ("auraloss.freq", "imports auraloss.freq")]
