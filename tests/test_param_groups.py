"""normuon.param_groups: every parameter in exactly one group, the right one per the docstring."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normuon import Muon, NorMuon, param_groups
from normuon.grouping import describe_groups, matrix_layouts

BOTH = [NorMuon, Muon]


# ------------------------------------------------------------------ models


class RMSNormGain(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain


class Block(nn.Module):
    def __init__(self, d, use_rms):
        super().__init__()
        self.ln1 = RMSNormGain(d) if use_rms else nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.RMSNorm(d) if use_rms else nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.d = d

    def forward(self, x):
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax((q @ k.transpose(-1, -2)) / self.d**0.5, dim=-1)
        x = x + self.o(att @ v)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=17, d=8, ctx=6, layers=2, tied=False):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, use_rms=i % 2 == 1) for i in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb[: idx.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class TinyCNN(nn.Module):
    def __init__(self, head_name="classifier"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(6, 6)
        self.head_name = head_name
        setattr(self, head_name, nn.Linear(6, 5))

    def forward(self, x):
        return getattr(self, self.head_name)(torch.relu(self.hidden(self.features(x))))


class MoEConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 5, kernel_size=3, padding=1)
        self.experts = nn.Parameter(torch.randn(4, 6, 5) * 0.1)  # (E, m, n) stack
        self.router = nn.Linear(5, 4, bias=False)
        self.norm = nn.LayerNorm(5)
        self.scale = nn.Parameter(torch.tensor(1.0))  # 0-D scalar

    def forward(self, x):  # x: (B, 3, L)
        h = self.norm(self.conv(x).transpose(1, 2))  # (B, L, 5)
        gate = torch.softmax(self.router(h), dim=-1)  # (B, L, E)
        out = torch.einsum("ble,emn,bln->blm", gate, self.experts, h)
        return self.scale * out


# ------------------------------------------------------------------ helpers


def _assignment(model, groups):
    """name -> 'matrix' | 'conv' | 'transposed' | 'adamw'; every parameter in exactly one group."""
    where: dict[int, str] = {}
    for g in groups:
        kind = "adamw" if g.get("algorithm") == "adamw" else {
            "conv": "conv", "transposed": "transposed"
        }.get(g.get("layout"), "matrix")
        for p in g["params"]:
            assert id(p) not in where, "parameter in more than one group"
            where[id(p)] = kind
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(where) == trainable, "groups do not cover exactly the trainable parameters"
    return {name: where[id(p)] for name, p in model.named_parameters() if id(p) in where}


def _expected_gpt(model):
    expected = {}
    for name, p in model.named_parameters():
        if name in ("tok_emb.weight", "pos_emb", "lm_head.weight") or p.ndim < 2:
            expected[name] = "adamw"
        else:
            expected[name] = "matrix"
    return expected


# ------------------------------------------------------------------ GPT


def test_gpt_untied():
    model = TinyGPT()
    got = _assignment(model, param_groups(model))
    assert got == _expected_gpt(model)
    # spot checks, spelled out
    assert got["blocks.0.q.weight"] == "matrix"
    assert got["blocks.1.mlp.2.weight"] == "matrix"
    assert got["blocks.0.v.bias"] == "adamw"
    assert got["blocks.0.ln1.weight"] == "adamw" and got["blocks.1.ln2.weight"] == "adamw"
    assert got["blocks.1.ln1.gain"] == "adamw"
    assert got["lm_head.weight"] == "adamw"
    assert got["pos_emb"] == "adamw"


def test_gpt_tied_head():
    model = TinyGPT(tied=True)
    assert model.lm_head.weight is model.tok_emb.weight
    groups = param_groups(model)
    got = _assignment(model, groups)
    assert got["tok_emb.weight"] == "adamw"
    adamw = next(g for g in groups if g.get("algorithm") == "adamw")
    assert sum(p is model.tok_emb.weight for p in adamw["params"]) == 1
    matrix_count = sum(len(g["params"]) for g in groups if g.get("algorithm") != "adamw")
    assert matrix_count == 2 * 6  # q, k, v, o, mlp.0, mlp.2 per block


def test_tied_head_with_unhinted_names():
    """A head tied to an embedding goes to AdamW whatever the names are."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lookup = nn.Embedding(11, 6)
            self.hidden = nn.Linear(6, 6)
            self.decoder = nn.Linear(6, 11, bias=False)
            self.decoder.weight = self.lookup.weight

    model = Model()
    got = _assignment(model, param_groups(model))
    assert got == {"lookup.weight": "adamw", "hidden.weight": "matrix", "hidden.bias": "adamw"}


@pytest.mark.parametrize("pos_name", ["wpe", "position_embedding", "pos_emb", "cls_token"])
def test_free_embedding_parameters_by_name(pos_name):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, pos_name, nn.Parameter(torch.randn(5, 4)))
            self.proj = nn.Linear(4, 4, bias=False)

    model = Model()
    got = _assignment(model, param_groups(model))
    assert got == {pos_name: "adamw", "proj.weight": "matrix"}


def test_three_d_position_embedding_goes_to_adamw():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_emb = nn.Parameter(torch.randn(1, 5, 4))
            self.proj = nn.Linear(4, 4, bias=False)

    model = Model()
    assert _assignment(model, param_groups(model))["pos_emb"] == "adamw"


@pytest.mark.parametrize("head", ["lm_head", "head", "output", "classifier", "fc_out", "score"])
def test_head_names(head):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            setattr(self, head, nn.Linear(4, 3))

    model = Model()
    got = _assignment(model, param_groups(model))
    assert got[f"{head}.weight"] == "adamw" and got[f"{head}.bias"] == "adamw"
    assert got["body.weight"] == "matrix"


def test_head_name_matches_own_name_only():
    """Only the module's own name counts: 'head' inside a longer name is not a head."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.multihead = nn.Linear(4, 4, bias=False)
            self.heads = nn.ModuleDict({"head": nn.Linear(4, 2, bias=False)})

    model = Model()
    got = _assignment(model, param_groups(model))
    assert got == {"multihead.weight": "matrix", "heads.head.weight": "adamw"}


# ------------------------------------------------------------------ CNN, MoE, Conv1d


def test_cnn_classifier():
    model = TinyCNN("classifier")
    groups = param_groups(model)
    got = _assignment(model, groups)
    assert got["features.0.weight"] == "conv" and got["features.3.weight"] == "conv"
    assert got["features.0.bias"] == "adamw"
    assert got["features.1.weight"] == "adamw" and got["features.1.bias"] == "adamw"
    assert got["hidden.weight"] == "matrix" and got["hidden.bias"] == "adamw"
    assert got["classifier.weight"] == "adamw" and got["classifier.bias"] == "adamw"
    conv_group = next(g for g in groups if g.get("layout") == "conv")
    assert "algorithm" not in conv_group
    # BatchNorm buffers are not parameters and appear nowhere.
    all_params = [p for g in groups for p in g["params"]]
    assert not any(p is model.features[1].running_mean for p in all_params)


def test_cnn_top_level_fc_is_a_head_and_extra_adamw_still_applies():
    """A top-level 'fc' (ResNet convention) is a head; extra_adamw moves anything else."""
    model = TinyCNN("fc")
    got = _assignment(model, param_groups(model))
    assert got["fc.weight"] == "adamw" and got["hidden.weight"] == "matrix"
    got = _assignment(model, param_groups(model, extra_adamw=["hidden."]))
    assert got["hidden.weight"] == "adamw"


def test_moe_and_conv1d():
    model = MoEConv1d()
    groups = param_groups(model)
    got = _assignment(model, groups)
    assert got == {
        "conv.weight": "conv",
        "conv.bias": "adamw",
        "experts": "matrix",
        "router.weight": "adamw",  # an MoE router (beside experts): docs/moe-router.md
        "norm.weight": "adamw",
        "norm.bias": "adamw",
        "scale": "adamw",
    }
    matrix_group = next(g for g in groups if g.get("algorithm") is None and "layout" not in g)
    assert any(p is model.experts for p in matrix_group["params"])


@pytest.mark.parametrize("cls", BOTH)
def test_conv1d_group_uses_conv_layout_in_optimizer(cls):
    """Conv1d weights (out, in, k) must be flattened per output channel, not stacked."""
    model = MoEConv1d()
    opt = cls(param_groups(model), ns_dtype=torch.float32)
    model(torch.randn(2, 3, 7)).square().mean().backward()
    opt.step()
    state = opt.state[model.conv.weight]
    assert state["momentum_buffer"].shape == model.conv.weight.shape
    if cls is NorMuon:
        assert state["neuron_second_moment"].shape == (5,)  # one per output channel
        assert opt.state[model.experts]["neuron_second_moment"].shape == (4, 6)


def test_requires_grad_false_excluded():
    model = TinyGPT()
    model.blocks[0].q.weight.requires_grad_(False)
    model.ln_f.weight.requires_grad_(False)
    groups = param_groups(model)
    listed = [p for g in groups for p in g["params"]]
    assert not any(p is model.blocks[0].q.weight for p in listed)
    assert not any(p is model.ln_f.weight for p in listed)
    _assignment(model, groups)


def test_extra_adamw_by_qualified_name():
    model = TinyGPT()
    got = _assignment(model, param_groups(model, extra_adamw=["blocks.0.mlp"]))
    assert got["blocks.0.mlp.0.weight"] == "adamw" and got["blocks.0.mlp.2.weight"] == "adamw"
    assert got["blocks.1.mlp.0.weight"] == "matrix"


# ------------------------------------------------------------------ overrides and errors


def test_overrides_are_routed():
    model = MoEConv1d()
    groups = param_groups(
        model, lr=0.05, weight_decay=0.1, ns_steps=4, adamw_lr=1e-3, adamw_betas=(0.8, 0.9)
    )
    for g in groups:
        if g.get("algorithm") == "adamw":
            assert g["lr"] == 1e-3 and g["betas"] == (0.8, 0.9)
            assert "weight_decay" not in g and "ns_steps" not in g
            assert not any(k.startswith("adamw_") for k in g)
        else:
            assert g["lr"] == 0.05 and g["weight_decay"] == 0.1 and g["ns_steps"] == 4
            assert "betas" not in g
    opt = NorMuon(groups, adamw_weight_decay=0.3)
    adamw = next(g for g in opt.param_groups if g["algorithm"] == "adamw")
    assert adamw["lr"] == 1e-3 and adamw["weight_decay"] == 0.3
    matrix = next(g for g in opt.param_groups if g["algorithm"] == "normuon")
    assert matrix["lr"] == 0.05 and matrix["momentum"] == 0.95


def test_adamw_override_changes_adamw_step():
    """adamw_lr really sets the AdamW group's step size (first AdamW step moves by ~lr)."""
    model = TinyGPT()
    opt = Muon(param_groups(model, adamw_lr=1e-3))
    before = model.ln_f.bias.detach().clone()
    model(torch.randint(0, 17, (2, 6))).square().mean().backward()
    opt.step()
    moved = (model.ln_f.bias.detach() - before).abs()
    nonzero = model.ln_f.bias.grad.abs() > 1e-6
    assert nonzero.any()
    torch.testing.assert_close(moved[nonzero], torch.full_like(moved[nonzero], 1e-3), rtol=1e-3,
                               atol=0)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)),
        nn.ModuleDict({"head": nn.Linear(4, 3), "norm": nn.LayerNorm(4)}),
        nn.Linear(4, 3).requires_grad_(False),
    ],
    ids=["embedding_norm", "head_only", "frozen"],
)
def test_nothing_for_matrix_optimizer_raises(model):
    with pytest.raises(ValueError, match=r"has no hidden matrix for NorMuon/Muon"):
        param_groups(model)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("kind", ["gpt", "gpt_tied", "cnn", "moe"])
def test_groups_work_with_optimizer(cls, kind):
    torch.manual_seed(0)
    if kind.startswith("gpt"):
        model = TinyGPT(tied=kind == "gpt_tied")
        loss_fn = lambda: model(torch.randint(0, 17, (2, 6))).square().mean()
    elif kind == "cnn":
        model = TinyCNN()
        loss_fn = lambda: model(torch.randn(2, 3, 5, 5)).square().mean()
    else:
        model = MoEConv1d()
        loss_fn = lambda: model(torch.randn(2, 3, 7)).square().mean()
    opt = cls(param_groups(model, weight_decay=0.01), ns_dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.grad is not None and p.grad.abs().max() > 0:
            assert not torch.equal(p, before[name]), f"{name} did not move"
        state = opt.state[p]
        if p.ndim < 2 or name in ("pos_emb", "tok_emb.weight", "lm_head.weight",
                                  "classifier.weight", "router.weight"):
            assert "exp_avg" in state, name
        else:
            assert "momentum_buffer" in state, name


# ------------------------------------------------------------------ vision conventions


class BasicBlock(nn.Module):
    """ResNet block: two 3x3 convs, a 1x1 downsample, and (unusually) an fc gate inside."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        )
        self.fc = nn.Linear(c_out, c_out)  # squeeze-excitation style gate: a hidden matrix

    def forward(self, x):  # x: (B, c_in, H, W)
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        gate = torch.sigmoid(self.fc(h.mean((2, 3))))[:, :, None, None]  # (B, c_out, 1, 1)
        return torch.relu(h * gate + self.downsample(x))


class ResNetLike(nn.Module):
    """torchvision naming: conv1, bn1, layerN.M, fc at the top."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlock(4, 6), BasicBlock(6, 6))
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        h = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


class TimmMlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TimmAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # x: (B, T, d)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


class TimmBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), TimmAttention(d)
        self.norm2, self.mlp = nn.LayerNorm(d), TimmMlp(d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmHead(nn.Module):
    """ConvNeXt-style head: norm + fc."""

    def __init__(self, d, classes):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, classes)

    def forward(self, x):
        return self.fc(self.norm(x))


class TimmLike(nn.Module):
    """timm ViT naming: patch_embed.proj, cls_token, pos_embed, blocks.N, head (or head.fc)."""

    def __init__(self, d=8, classes=5, head_with_fc=False):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.blocks = nn.Sequential(TimmBlock(d), TimmBlock(d))
        self.norm = nn.LayerNorm(d)
        self.head = TimmHead(d, classes) if head_with_fc else nn.Linear(d, classes)

    def forward(self, x):  # x: (B, 3, 4, 4) -> 4 patches + cls token
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, 4, d)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1)
        return self.head(self.norm(self.blocks(tokens + self.pos_embed))[:, 0])


class VGGLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 5))


def test_resnet_like_routing():
    model = ResNetLike()
    got = _assignment(model, param_groups(model))
    for name in ["conv1.weight", "layer1.0.conv1.weight", "layer1.1.conv2.weight",
                 "layer1.0.downsample.0.weight"]:  # fmt: skip
        assert got[name] == "conv", name
    # The fc inside a block is hidden; the top-level fc is the classifier head.
    assert got["layer1.0.fc.weight"] == "matrix" and got["layer1.1.fc.weight"] == "matrix"
    assert got["fc.weight"] == "adamw" and got["fc.bias"] == "adamw"
    assert all(got[n] == "adamw" for n in got if ".bn" in n or n.startswith("bn"))


def test_top_level_fc_found_through_wrappers():
    """A LightningModule-style holder, DDP's 'module.' and nested single wrappers keep fc a head."""

    class Holder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

    model = Holder(Holder(ResNetLike()))
    got = _assignment(model, param_groups(model))
    assert got["model.model.fc.weight"] == "adamw"
    assert got["model.model.layer1.0.fc.weight"] == "matrix"


@pytest.mark.parametrize("head_with_fc", [False, True], ids=["head", "head.fc"])
def test_timm_like_routing(head_with_fc):
    model = TimmLike(head_with_fc=head_with_fc)
    groups = param_groups(model)
    got = _assignment(model, groups)
    head = "head.fc" if head_with_fc else "head"
    assert got[f"{head}.weight"] == "adamw" and got[f"{head}.bias"] == "adamw"
    # The patch embedding embeds the input: AdamW, as token embeddings.
    assert got["patch_embed.proj.weight"] == "adamw"
    assert got["cls_token"] == "adamw" and got["pos_embed"] == "adamw"
    for i in range(2):
        for layer in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]:
            assert got[f"blocks.{i}.{layer}.weight"] == "matrix", (i, layer)
            assert got[f"blocks.{i}.{layer}.bias"] == "adamw", (i, layer)
    # Routing is usable as is.
    opt = NorMuon(groups, ns_dtype=torch.float32)
    model(torch.randn(2, 3, 4, 4)).square().mean().backward()
    opt.step()


def test_timm_like_split_qkv():
    model = TimmLike(d=8)
    groups = param_groups(model, split_qkv=True)
    split = [g for g in groups if g.get("split_sizes") is not None]
    assert len(split) == 1 and split[0]["split_sizes"] == (8, 8, 8)
    assert [p.shape for p in split[0]["params"]] == [(24, 8), (24, 8)]
    assert all(p is b.attn.qkv.weight for p, b in zip(split[0]["params"], model.blocks))


def test_sequential_classifier_routing():
    model = VGGLike()
    got = _assignment(model, param_groups(model))
    assert got["classifier.0.weight"] == "adamw" and got["classifier.3.weight"] == "adamw"
    assert got["features.0.weight"] == "conv"


def test_hidden_output_dense_in_bert_style_encoder_stays_matrix():
    """'output' marks a head only as the Linear's own name: BERT's attention.output.dense is
    hidden."""

    class Output(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(4, 4)
            self.LayerNorm = nn.LayerNorm(4)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Module()
            self.attention.output = Output()
            self.output = Output()

    model = nn.Module()
    model.encoder = nn.ModuleList([Layer()])
    model.output = nn.Linear(4, 3)
    got = _assignment(model, param_groups(model))
    assert got["encoder.0.attention.output.dense.weight"] == "matrix"
    assert got["encoder.0.output.dense.weight"] == "matrix"
    assert got["output.weight"] == "adamw"


def test_get_output_embeddings_marks_the_head():
    """A Hugging Face style model names its output projection through get_output_embeddings."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.decoder_proj = nn.Linear(4, 9)

        def get_output_embeddings(self):
            return self.decoder_proj

    model = Model()
    assert _assignment(model, param_groups(model))["decoder_proj.weight"] == "adamw"


# ------------------------------------------------------------------ transposed weights


class TransposedLinear(nn.Module):
    """A user weight stored (in, out) and used as x @ W."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out) * 0.1)

    def forward(self, x):
        return x @ self.w


class FakeConv1D(nn.Module):
    """Same attributes as transformers' Conv1D (weight (nx, nf), x @ W + b): recognised by name."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


FakeConv1D.__name__ = "Conv1D"


def test_conv1d_by_class_name_goes_to_transposed_group():
    model = nn.Module()
    model.c_attn = FakeConv1D(12, 4)
    model.c_proj = FakeConv1D(4, 4)
    model.lin = nn.Linear(4, 4)
    groups = param_groups(model)
    got = _assignment(model, groups)
    assert got == {"c_attn.weight": "transposed", "c_attn.bias": "adamw",
                   "c_proj.weight": "transposed", "c_proj.bias": "adamw",
                   "lin.weight": "matrix", "lin.bias": "adamw"}  # fmt: skip
    transposed = next(g for g in groups if g.get("layout") == "transposed")
    assert "split_sizes" not in transposed  # the paper's default: the fused QKV is one matrix
    split = param_groups(model, split_qkv=True)
    blocks = {tuple(p.shape): g.get("split_sizes") for g in split for p in g["params"]
              if g.get("layout") == "transposed"}  # fmt: skip
    assert blocks == {(4, 12): (4, 4, 4), (4, 4): None}


def test_a_module_named_conv1d_with_other_shape_is_not_transposed():
    class Conv1D(nn.Module):  # same name, but a (out, in) weight without nx/nf
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

    model = nn.Module()
    model.layer = Conv1D()
    assert _assignment(model, param_groups(model)) == {"layer.weight": "matrix"}


@pytest.mark.parametrize("spec", [["mixer.w"], lambda name, p: name.endswith(".w")],
                         ids=["names", "predicate"])  # fmt: skip
def test_user_declared_transposed(spec):
    model = nn.Module()
    model.mixer = TransposedLinear(4, 6)
    model.proj = nn.Linear(6, 4)
    got = _assignment(model, param_groups(model, transposed=spec))
    assert got == {"mixer.w": "transposed", "proj.weight": "matrix", "proj.bias": "adamw"}


def test_matrix_layouts_agree_with_the_groups():
    # matrix_layouts is what the neuron diagnostics read weights with: it must give every
    # matrix the layout of its param_groups group, and heads/embeddings a layout too.
    model = MoEConv1d()
    model.c_fc = FakeConv1D(8, 5)
    model.mixer = TransposedLinear(5, 7)
    model.tok_emb = nn.Embedding(9, 5)
    model.lm_head = nn.Linear(5, 9, bias=False)
    layouts = matrix_layouts(model, transposed=["mixer.w"])
    assert layouts == {"conv.weight": "conv", "experts": "auto", "router.weight": "auto",
                       "c_fc.weight": "transposed", "mixer.w": "transposed",
                       "tok_emb.weight": "auto", "lm_head.weight": "auto"}  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = 0
    for g in param_groups(model, transposed=["mixer.w"]):
        if g.get("algorithm") == "adamw":
            continue
        for p in g["params"]:
            assert layouts[names[id(p)]] == g.get("layout", "auto"), names[id(p)]
            matrices += 1
    assert matrices == 4  # conv, experts, c_fc, mixer (the router goes to AdamW)
    assert matrix_layouts(model)["mixer.w"] == "auto"  # not declared: the shape decides
    with pytest.raises(TypeError, match="got list"):
        matrix_layouts([model.experts])


def test_transposed_bad_input():
    model = nn.Module()
    model.mixer = TransposedLinear(4, 6)
    model.stack = nn.Parameter(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"transposed: no parameter name contains \['mixr'\]"):
        param_groups(model, transposed=["mixr"])
    with pytest.raises(ValueError, match=r"transposed: stack has shape \(2, 3, 4\)"):
        param_groups(model, transposed=["stack"])
    with pytest.raises(TypeError, match=r"transposed must be .* got the string 'mixer.w'"):
        param_groups(model, transposed="mixer.w")
    with pytest.raises(TypeError, match=r"transposed entries must be non-empty strings, got 3"):
        param_groups(model, transposed=[3])
    with pytest.raises(TypeError, match=r"split_qkv must be True or False, got 'yes'"):
        param_groups(model, split_qkv="yes")
    with pytest.raises(ValueError, match=r"param_groups sets 'layout' per group itself"):
        param_groups(model, layout="transposed")
    with pytest.raises(TypeError, match=r"expects an nn.Module, got list"):
        param_groups([model.stack])


def test_split_qkv_rejects_unequal_fused_projection():
    model = nn.Module()
    model.qkv_proj = nn.Linear(8, 8 + 2 * 2)  # grouped-query: q 8, k 2, v 2
    with pytest.raises(ValueError, match=r"split_qkv=True: qkv_proj.weight has 12 outputs for 8"):
        param_groups(model, split_qkv=True)
    assert param_groups(model)[0]["params"][0] is model.qkv_proj.weight


def test_split_qkv_multihead_attention_in_proj():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    groups = param_groups(model, split_qkv=True)
    split = next(g for g in groups if g.get("split_sizes"))
    assert split["split_sizes"] == (8, 8, 8) and split["params"][0] is model.attn.in_proj_weight
    opt = Muon(groups, ns_dtype=torch.float32)
    x = torch.randn(3, 2, 8)
    model.attn(x, x, x)[0].square().mean().backward()
    opt.step()


# ------------------------------------------------------------------ describe_groups


def test_describe_groups_layouts_and_neurons():
    model = MoEConv1d()
    rows = {r.name: r for r in describe_groups(model, param_groups(model)).rows}
    assert (rows["conv.weight"].layout, rows["conv.weight"].neurons) == ("conv", 5)
    assert (rows["experts"].layout, rows["experts"].neurons) == ("auto", 4 * 6)  # E x m
    assert (rows["router.weight"].algorithm, rows["router.weight"].neurons) == ("adamw", None)
    assert (rows["scale"].algorithm, rows["scale"].shape, rows["scale"].neurons) == (
        "adamw", (), None)  # fmt: skip
    assert "scalar" in str(describe_groups(model, param_groups(model)))
    opt = NorMuon(param_groups(model), ns_dtype=torch.float32)
    model(torch.randn(2, 3, 7)).square().mean().backward()
    opt.step()
    # The neuron count is the size of NorMuon's second moment for these layouts.
    rows = {r.name: r for r in describe_groups(model, opt).rows}
    for name in ["conv.weight", "experts"]:
        p = dict(model.named_parameters())[name]
        assert rows[name].algorithm == "normuon"
        assert opt.state[p]["neuron_second_moment"].numel() == rows[name].neurons, name


def test_describe_groups_bad_input():
    model = MoEConv1d()
    with pytest.raises(TypeError, match=r"group 0 is not a dict with 'params'"):
        describe_groups(model, [[model.experts]])
    with pytest.raises(ValueError, match=r"a parameter of shape \(4, 6, 5\) is in groups 0 and 1"):
        describe_groups(model, [{"params": [model.experts]}, {"params": [model.experts]}])


def test_transposed_names_from_a_generator_are_checked():
    model = nn.Module()
    model.mixer = TransposedLinear(4, 6)
    model.proj = nn.Linear(6, 4)
    with pytest.raises(ValueError, match=r"no parameter name contains \['nope'\]"):
        param_groups(model, transposed=(s for s in ["mixer.w", "nope"]))


def test_describe_groups_stacked_layout_counts_every_matrix():
    model = nn.Module()
    model.kernels = nn.Parameter(torch.randn(2, 3, 4, 5))  # stacked: 2 x 3 matrices of (4, 5)
    rows = describe_groups(model, [{"params": [model.kernels], "layout": "stacked"}]).rows
    assert rows[0].neurons == 2 * 3 * 4
    rows = describe_groups(model, [{"params": [model.kernels]}]).rows  # auto: a conv kernel
    assert rows[0].neurons == 2
    opt = NorMuon([{"params": [model.kernels], "layout": "stacked"}], ns_dtype=torch.float32)
    model.kernels.grad = torch.randn_like(model.kernels)
    opt.step()
    assert opt.state[model.kernels]["neuron_second_moment"].numel() == 2 * 3 * 4


def test_vit_patch_embedding_goes_to_adamw_and_other_convs_stay_matrices():
    """Hugging Face ViT: the Conv2d patch embedding is an input embedding; a conv elsewhere
    (not named as an embedding) stays a matrix."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4, num_channels=3, num_labels=3,
    ))  # fmt: skip
    groups = param_groups(model)
    got = _assignment(model, groups)
    assert got["vit.embeddings.patch_embeddings.projection.weight"] == "adamw"
    assert got["vit.layers.0.attention.q_proj.weight"] == "matrix"
    assert got["vit.layers.0.mlp.fc1.weight"] == "matrix"
    assert got["classifier.weight"] == "adamw"
    cnn = ResNetLikeConv()  # a conv stem that is not named as an embedding
    assert _assignment(cnn, param_groups(cnn))["conv1.weight"] == "conv"


class ResNetLikeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)


def _mixtral_like(rows_fused: bool = True) -> nn.Module:
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            if rows_fused:  # transformers' Mixtral layout: (E, 2 ff, d) and (E, d, ff)
                self.gate_up_proj = nn.Parameter(torch.randn(4, 2 * 6, 8))
                self.down_proj = nn.Parameter(torch.randn(4, 8, 6))
            else:  # Aria's: (E, d, 2 ff) and (E, ff, d)
                self.gate_up_proj = nn.Parameter(torch.randn(4, 8, 2 * 6))
                self.down_proj = nn.Parameter(torch.randn(4, 6, 8))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()
            self.mlp = nn.ModuleDict({"gate_up_proj": nn.Linear(8, 10), "down": nn.Linear(5, 8)})

    return Model()


@pytest.mark.parametrize("rows_fused", [True, False], ids=["E-2ff-d", "E-d-2ff"])
def test_split_gate_up_splits_fused_experts_and_linears(rows_fused):
    model = _mixtral_like(rows_fused)
    plain = param_groups(model)
    assert all(g.get("split_sizes") is None for g in plain)
    groups = param_groups(model, split_gate_up=True)
    by_param = {id(p): g for g in groups for p in g["params"]}
    experts = by_param[id(model.experts.gate_up_proj)]
    assert experts["split_sizes"] == (6, 6)
    assert experts.get("layout", "auto") == ("auto" if rows_fused else "transposed")
    linear = by_param[id(model.mlp["gate_up_proj"].weight)]
    assert linear["split_sizes"] == (5, 5) and linear.get("layout", "auto") == "auto"
    assert by_param[id(model.experts.down_proj)].get("split_sizes") is None
    table = str(describe_groups(model, groups))
    assert "6+6" in table and "5+5" in table
    # Each half is orthogonalized alone: the optimizer runs on these groups.
    opt = NorMuon(groups, ns_dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def test_split_gate_up_rejects_an_odd_fused_projection():
    model = nn.Module()
    model.gate_up_proj = nn.Linear(4, 7)
    with pytest.raises(ValueError, match="gate_up_proj.weight of shape \\(7, 4\\)"):
        param_groups(model, split_gate_up=True)
    with pytest.raises(TypeError, match="split_gate_up"):
        param_groups(model, split_gate_up="yes")


def test_split_gate_up_on_transformers_mixtral():
    from hf_models import tiny_mixtral

    model = tiny_mixtral()
    groups = param_groups(model, split_gate_up=True)
    by_param = {id(p): g for g in groups for p in g["params"]}
    experts = model.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (4, 48, 16)
    assert by_param[id(experts.gate_up_proj)]["split_sizes"] == (24, 24)
    assert by_param[id(experts.down_proj)].get("split_sizes") is None
    opt = NorMuon(groups, ns_dtype=torch.float32)
    tokens = torch.randint(0, 32, (2, 8))
    model(tokens, labels=tokens).loss.backward()
    opt.step()


def test_moe_routers_go_to_adamw_and_other_gates_stay_matrices():
    """Routers (a ...Router module, or gate/router beside experts) go to AdamW (evidence:
    docs/moe-router.md); a gated MLP's gate projection is a hidden matrix."""
    from hf_models import tiny_mixtral

    mixtral = tiny_mixtral()
    got = _assignment(mixtral, param_groups(mixtral))
    assert got["model.layers.0.mlp.gate.weight"] == "adamw"
    assert got["model.layers.0.mlp.experts.gate_up_proj"] == "matrix"

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(8, 4, bias=False)
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    class GatedMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 16)  # a gated MLP's gate: hidden
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)

    model = nn.ModuleDict({"moe": MoE(), "mlp": GatedMLP()})
    got = _assignment(model, param_groups(model))
    assert got["moe.router.weight"] == "adamw"
    assert got["moe.experts.0.weight"] == "matrix"
    assert got["mlp.gate.weight"] == "matrix"


def test_router_parameters_held_by_a_child_module_go_to_adamw():
    """torchtitan's TokenChoiceTopKRouter keeps its weight in a child Linear
    (``moe.router.gate.weight``); a router named so beside experts may hold a child (here a
    Sequential) likewise. The whole
    router goes to AdamW, the stacked experts stay matrices."""

    class TokenChoiceTopKRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4, bias=False)

    class MoE(nn.Module):
        def __init__(self, router):
            super().__init__()
            self.router = router
            self.experts = nn.Parameter(torch.randn(4, 16, 8))

    for router in (TokenChoiceTopKRouter(), nn.Sequential(nn.Linear(8, 4))):
        model = nn.ModuleDict({"moe": MoE(router), "out": nn.Linear(8, 8)})
        got = _assignment(model, param_groups(model))
        routed = {name: alg for name, alg in got.items() if name.startswith("moe.router.")}
        assert routed and set(routed.values()) == {"adamw"}, got
        assert got["moe.experts"] == "matrix"


def test_allow_no_matrix_returns_the_adamw_group_alone():
    """A model with no hidden matrix (a pipeline stage holding only the embedding): an error by
    default (use AdamW), the AdamW group alone with allow_no_matrix=True."""
    stage = nn.ModuleDict({"tok_embeddings": nn.Embedding(16, 8), "norm": nn.LayerNorm(8)})
    with pytest.raises(ValueError, match="has no hidden matrix"):
        param_groups(stage)
    groups = param_groups(stage, allow_no_matrix=True, adamw_lr=1e-3)
    assert [g["algorithm"] for g in groups] == ["adamw"] and groups[0]["lr"] == 1e-3
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in stage.parameters()}
    with pytest.raises(TypeError, match="allow_no_matrix must be True or False, got 1"):
        param_groups(stage, allow_no_matrix=1)
