"""Vision beyond ViT: transformers' Swin (shifted windows, their mask, relative position bias,
patch merging) against ports/vision/swin.py, and CLIP (two towers, padded captions, the
contrastive loss) against ports/vision/clip.py. The correct ports pass with the pixel gradient
judged; broken ports fail and name the module that holds the bug."""

import paddle
import pytest
from conftest import after_init, localized_to

from ports.vision import clip as C
from ports.vision import swin as S


def test_swin_passes_with_its_pixel_gradient(run_cli, bug_ledger):
    code, report, _ = run_cli("run", "swin", "--dtype", "fp32")
    bug_ledger.record_clean("swin", false_alarm=report["verdict"] != "pass")
    assert code == 0 and report["verdict"] == "pass", report["problems"]
    assert [g["name"] for g in report["input_grads"]] == ["input:pixel_values"]
    tf = next(r for r in report["runs"] if r["mode"] == "teacher_forced")
    names = {layer["name"] for layer in tf["layers"]}
    # What makes Swin Swin is there, and judged: the tables, the merging, every block.
    assert "swin.encoder.layers.0.blocks.1.attention.relative_position_bias" in names
    assert {"swin.encoder.layers.0.downsample", "swin.encoder.layers.1.downsample"} <= names
    tables = [p for p in report["param_grads"] if p["name"].endswith("relative_position_bias_table")]
    assert len(tables) == 6 and all(p["passed"] for p in tables)


def test_the_tiny_config_really_shifts(run_cli):
    """Windows that shift, over a map larger than one window; the last stage is one window,
    which the reference clamps to no shift. Without this the shift bugs below could not show."""
    import torch
    from conftest import REGISTRY
    from transformers import SwinConfig, SwinForImageClassification

    from align.registry.load import load_registry

    values = load_registry(REGISTRY).get("swin").configs["tiny"]
    model = SwinForImageClassification(SwinConfig(**values))
    grid = values["image_size"] // values["patch_size"]
    stages = model.swin.encoder.layers
    for i, stage in enumerate(stages[:-1]):
        side = grid // 2**i
        assert side > values["window_size"] and stage.blocks[1].shift_size == values["window_size"] // 2
        assert stage.blocks[1].get_attn_mask(side, side, dtype=torch.float32, device="cpu").min() < 0
    assert grid // 2 ** (len(stages) - 1) == values["window_size"]


def test_torchvision_imports_and_its_missing_ops_say_so():
    """The registry's torchvision is a CUDA build whose ops cannot load on this torch; with
    reference.torchvision_ops its Python code imports (timm's and transformers' Swin need it),
    and an op called says what is missing instead of computing anything."""
    import subprocess
    import sys

    code = ("import torch, torchvision, timm\n"
            "from transformers import SwinForImageClassification\n"
            "try:\n"
            "    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
            "except RuntimeError as e:\n"
            "    print('raised', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("raised") and "Couldn't load custom C++ ops" in proc.stdout


# --- broken ports -------------------------------------------------------------------------------

def roll_the_wrong_way(mp):
    """The cyclic shift (and its undoing) in the wrong direction: the windows no longer hold
    what the shifted-window mask was built for."""
    roll = paddle.roll

    def reversed_roll(x, shifts, axis=None, name=None):
        return roll(x, shifts=tuple(-s for s in shifts), axis=axis)

    mp.setattr(S.paddle, "roll", reversed_roll)


def relative_position_index_transposed(mp):
    def transpose(self, *a):
        area = self.window_size**2
        self.relative_position_index.set_value(self.relative_position_index.reshape([area, area]).t().flatten())

    after_init(mp, S.SwinRelativePositionBias, transpose)


def shift_mask_left_out(mp):
    mp.setattr(S, "shifted_window_mask", lambda h, w, ws, shift, dtype: paddle.zeros([(h // ws) * (w // ws), ws * ws, ws * ws], dtype=dtype))


def merged_row_major(mp):
    """The four 2x2 neighbours concatenated row-major, (0,0), (0,1), (1,0), (1,1): the same
    values, in an order the reduction's weights were not trained for."""
    def forward(self, input_feature, input_dimensions):
        H, W = input_dimensions
        B, _, C = input_feature.shape
        x = input_feature.reshape([B, H, W, C])
        x = paddle.concat([x[:, row::2, col::2, :] for row in range(2) for col in range(2)], axis=-1)
        return self.reduction(self.norm(x.reshape([B, -1, 4 * C])))

    mp.setattr(S.SwinPatchMerging, "forward", forward)


def bias_table_without_gradient(mp):
    def forward(self):
        area = self.window_size**2
        bias = paddle.gather(self.relative_position_bias_table.detach(), self.relative_position_index)
        return bias.reshape([area, area, -1]).transpose([2, 0, 1]).unsqueeze(0)

    mp.setattr(S.SwinRelativePositionBias, "forward", forward)


SHIFTED = "swin.encoder.layers.[01].blocks.1"
BUGS = {  # name: (inject, culprit glob, direction)
    "swin:roll_the_wrong_way": (roll_the_wrong_way, SHIFTED, "forward"),
    "swin:relative_position_index_transposed": (relative_position_index_transposed,
                                                "swin.encoder.layers.*.blocks.*.attention.relative_position_bias", "forward"),
    "swin:shift_mask_left_out": (shift_mask_left_out, SHIFTED, "forward"),
    "swin:merged_row_major": (merged_row_major, "swin.encoder.layers.*.downsample", "forward"),
    "swin:bias_table_without_gradient": (bias_table_without_gradient,
                                         "swin.encoder.layers.*.blocks.*.attention.relative_position_bias", "backward"),
}


def test_clip_passes_with_both_towers_and_the_loss_judged(run_cli, bug_ledger):
    code, report, _ = run_cli("run", "clip", "--dtype", "fp32")
    bug_ledger.record_clean("clip", false_alarm=report["verdict"] != "pass")
    assert code == 0 and report["verdict"] == "pass", report["problems"]
    outputs = {o["name"] for o in report["outputs"]}
    # return_loss = true (the recipe's constant) reached both forwards: both have a loss.
    assert {"loss", "logits_per_image", "logits_per_text", "text_model_output.pooler_output",
            "vision_model_output.pooler_output"} <= outputs
    grads = {p["name"] for p in report["param_grads"]}
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight",
            "vision_model.embeddings.class_embedding"} <= grads
    assert [g["name"] for g in report["input_grads"]] == ["input:pixel_values"]


def loss_over_one_axis(mp):
    """The image-to-text half taken over the text-to-image axis: each row's loss twice."""
    mp.setattr(C, "image_text_contrastive_loss", lambda s: (C.contrastive_loss(s) + C.contrastive_loss(s)) / 2.0)


def pooled_at_the_last_position(mp):
    """The text pooled at the sequence's last position, padding included, not at its eos."""
    forward = C.CLIPTextModel.forward

    def last(self, input_ids, attention_mask=None, position_ids=None):
        out = forward(self, input_ids, attention_mask, position_ids)
        out.pooler_output = out.last_hidden_state[:, -1]
        return out

    mp.setattr(C.CLIPTextModel, "forward", last)


def no_causal_mask(mp):
    """Only the padding masked: every token sees the tokens after it."""
    mp.setattr(C.paddle, "tril", lambda x, *a, **k: paddle.ones_like(x))


def logit_scale_not_exponentiated(mp):
    """The temperature used as stored, its log, not exp of it."""
    def forward(self, input_ids, pixel_values, attention_mask=None, position_ids=None, return_loss=None,
                interpolate_pos_encoding=False):
        vision = self.vision_model(pixel_values, interpolate_pos_encoding)
        vision.pooler_output = self.visual_projection(vision.pooler_output)
        text = self.text_model(input_ids, attention_mask, position_ids)
        text.pooler_output = self.text_projection(text.pooler_output)
        image_embeds = vision.pooler_output / C._vector_norm(vision.pooler_output)
        text_embeds = text.pooler_output / C._vector_norm(text.pooler_output)
        logits_per_text = paddle.matmul(text_embeds, image_embeds.t()) * self.logit_scale
        return C.CLIPOutput(C.image_text_contrastive_loss(logits_per_text) if return_loss else None,
                            logits_per_text.t(), logits_per_text, text_embeds, image_embeds, text, vision)

    mp.setattr(C.CLIPModel, "forward", forward)


def gelu_for_quick_gelu(mp):
    mp.setitem(C.ACTIVATIONS, "quick_gelu", lambda: paddle.nn.GELU())


CLIP_BUGS = {  # name: (inject, culprit glob, direction)
    "clip:loss_over_one_axis": (loss_over_one_axis, "<root>", "forward"),
    "clip:pooled_at_the_last_position": (pooled_at_the_last_position, "text_model", "forward"),
    "clip:no_causal_mask": (no_causal_mask, "text_model", "forward"),
    "clip:logit_scale_not_exponentiated": (logit_scale_not_exponentiated, "<root>", "forward"),
    "clip:gelu_for_quick_gelu": (gelu_for_quick_gelu, "*.encoder.layers.*.mlp.activation_fn", "forward"),
}


@pytest.mark.parametrize("bug", sorted(BUGS) + sorted(CLIP_BUGS))
def test_broken_port_fails_and_is_localized(bug, monkeypatch, run_cli, bug_ledger):
    inject, culprit, direction = {**BUGS, **CLIP_BUGS}[bug]
    inject(monkeypatch)
    code, report, err = run_cli("run", bug.split(":")[0], "--dtype", "fp32")
    detected, localized = localized_to(code, report, culprit, direction)
    bug_ledger.record(bug, "vision", detected, localized)
    assert detected and localized, (report["first_divergence"], report["culprits"], report["problems"])
    assert "Traceback" not in err
