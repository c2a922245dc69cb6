"""Local OpenAI weights: finding the file, reading the TorchScript archive, loading it into every family,
and the GELU/QuickGELU check. The archive is a fake ``ViT-B-16.pt`` traced at test time (conftest.py)."""

import warnings

import pytest
import torch
from backbone_helpers import convert_to_fp16, images, make_openai_clip, trace_openai_archive

from muse_pyramid.backbones import (
    QuickGELUMismatchWarning,
    build_open_clip_from_openai,
    check_quick_gelu,
    clip_tokenize,
    hf_clip_tokens,
    is_openai_release,
    load_openai_state_dict,
    load_openai_weights,
    open_clip_text_features,
    open_clip_tokens,
    openai_clip_tokens,
    resolve_openai_weights,
    timm_clip_tokens,
    uses_quick_gelu,
)

pytestmark = pytest.mark.backbones


def jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


# ---------------------------------------------------------------- reading the archive


def test_archive_is_refused_by_weights_only_load(openai_archive):
    path, _ = openai_archive
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="weights_only"):
        warnings.simplefilter("ignore", UserWarning)  # "looks like a TorchScript archive"
        torch.load(path, map_location="cpu", weights_only=True)


def test_load_archive_state_dict(openai_archive):
    path, model = openai_archive
    state_dict = load_openai_state_dict(path)
    expected = model.state_dict()
    assert set(state_dict) == set(expected)
    assert {"input_resolution", "context_length", "vocab_size", "visual.proj"} <= set(state_dict)
    assert is_openai_release(state_dict)
    for key, value in expected.items():
        torch.testing.assert_close(state_dict[key], value, rtol=0, atol=0)


@torch.no_grad()
def test_open_clip_from_archive_reproduces_its_embeddings(openai_archive):
    pytest.importorskip("open_clip")
    path, _ = openai_archive
    archive = jit_load(path)
    model = build_open_clip_from_openai(load_openai_state_dict(path))
    assert not model.training and uses_quick_gelu(model)
    x = images(3, 64, seed=4)
    pooled = archive.encode_image(x)
    torch.testing.assert_close(model.encode_image(x), pooled, rtol=1e-5, atol=1e-5)
    tokens = open_clip_tokens(model, x)
    assert tokens.shape == (3, 17, 96)  # a 4x4 grid, 96-wide embedding
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-5, atol=1e-5)
    # OpenAI's layout read straight from the TorchScript modules gives the same map.
    torch.testing.assert_close(openai_clip_tokens(archive.visual, x), tokens, rtol=1e-5, atol=1e-5)

    text = torch.randint(1, 990, (3, 16), generator=torch.Generator().manual_seed(5))
    text[:, 9] = 999  # the end token: the largest id
    text[:, 10:] = 0
    torch.testing.assert_close(open_clip_text_features(model, text), archive.encode_text(text), rtol=1e-5, atol=1e-5)
    # Shorter rows (CLIP4Clip's max_words < context length) give the same features: the attention is causal.
    torch.testing.assert_close(open_clip_text_features(model, text[:, :12]), archive.encode_text(text),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_open_clip_text_features_on_tokenized_captions():
    open_clip = pytest.importorskip("open_clip")
    model = build_open_clip_from_openai(make_openai_clip(seed=3, vocab_size=49408, context_length=77).state_dict())
    ids = clip_tokenize(["a dog runs on the beach", "two cats"], max_words=32)
    full = open_clip.tokenize(["a dog runs on the beach", "two cats"])  # 77 tokens
    expected = model.encode_text(full)
    torch.testing.assert_close(open_clip_text_features(model, ids), expected, rtol=1e-5, atol=1e-5)
    # The manual EOT read-out: ln_final output at the argmax id, times the projection.
    x = model.token_embedding(full) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    manual = x[torch.arange(2), full.argmax(dim=-1)] @ model.text_projection
    torch.testing.assert_close(expected, manual, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_every_family_loads_the_archive_to_the_same_map(openai_archive):
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    path, _ = openai_archive
    state_dict = load_openai_state_dict(path)
    x = images(2, 64, seed=6)
    reference = openai_clip_tokens(jit_load(path).visual, x)

    vit = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, img_size=64, embed_dim=128,
                            depth=2, num_heads=2, num_classes=96).eval()
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        image_size=64, patch_size=16, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=96, hidden_act="quick_gelu")).eval()
    openai = make_openai_clip(seed=9)  # the same layout, other weights
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuickGELUMismatchWarning)  # matching activations: no warning
        for model in (vit, hf, openai):
            load_openai_weights(model, state_dict)
    torch.testing.assert_close(timm_clip_tokens(vit, x), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_clip_tokens(hf, x), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(openai_clip_tokens(openai, x), reference, rtol=1e-5, atol=1e-5)


def test_fp16_archive_builds_an_fp32_model(tmp_path):
    pytest.importorskip("open_clip")
    model = convert_to_fp16(make_openai_clip(seed=2))
    path = tmp_path / "ViT-B-16.pt"
    trace_openai_archive(model, path)
    state_dict = load_openai_state_dict(path)
    assert state_dict["visual.conv1.weight"].dtype == torch.float16  # the file's dtypes are kept
    assert state_dict["visual.ln_post.weight"].dtype == torch.float32
    built = build_open_clip_from_openai(state_dict)
    assert all(p.dtype == torch.float32 for p in built.parameters())
    torch.testing.assert_close(built.visual.conv1.weight, state_dict["visual.conv1.weight"].float(), rtol=0, atol=0)


def test_plain_state_dicts(tmp_path, openai_archive):
    _, model = openai_archive
    weights = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in weights.items()}, ddp)
    assert set(load_openai_state_dict(ddp)) == set(weights)
    # A CLIP4Clip-style checkpoint: the CLIP lives under "clip.", next to other modules.
    clip4clip = tmp_path / "pytorch_model.bin.1"
    torch.save({"state_dict": {**{f"clip.{k}": v for k, v in weights.items()}, "sim.weight": torch.zeros(2)}},
               clip4clip)
    loaded = load_openai_state_dict(clip4clip, prefix="clip.")
    assert set(loaded) == set(weights) and not is_openai_release(loaded)
    with pytest.raises(ValueError, match="prefix='text.' matches no key"):
        load_openai_state_dict(clip4clip, prefix="text.")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_openai_state_dict(tmp_path / "missing.pt")


def test_architecture_mismatch_is_rejected_before_loading(openai_archive):
    path, _ = openai_archive
    state_dict = load_openai_state_dict(path)
    deeper = make_openai_clip(seed=4, vision_layers=3)
    before = deeper.visual.conv1.weight.clone()
    with pytest.raises(ValueError, match=r"does not fit OpenAICLIP: missing keys \['visual.transformer.resblocks.2"):
        load_openai_weights(deeper, state_dict)
    assert torch.equal(deeper.visual.conv1.weight, before)  # nothing was half-loaded
    load_openai_weights(deeper, state_dict, strict=False)
    torch.testing.assert_close(deeper.visual.conv1.weight, state_dict["visual.conv1.weight"], rtol=0, atol=0)
    with pytest.raises(TypeError, match="expected an open_clip CLIP"):
        load_openai_weights(torch.nn.Linear(2, 2), state_dict)


def test_non_vit_state_dict_is_rejected():
    pytest.importorskip("open_clip")
    with pytest.raises(ValueError, match=r"not an OpenAI-layout CLIP ViT: missing \['visual.conv1.weight'"):
        build_open_clip_from_openai({"visual.layer1.0.conv1.weight": torch.zeros(1)})


# ---------------------------------------------------------------- GELU / QuickGELU


@torch.no_grad()
def test_quick_gelu_mismatch_is_reported(openai_archive):
    timm = pytest.importorskip("timm")
    pytest.importorskip("open_clip")
    path, _ = openai_archive
    state_dict = load_openai_state_dict(path)
    assert uses_quick_gelu(jit_load(path)) is True  # read from the TorchScript modules' original names

    with pytest.warns(QuickGELUMismatchWarning, match="trained with QuickGELU but the model .* uses GELU"):
        gelu_model = build_open_clip_from_openai(state_dict, quick_gelu=False)
    # Why it matters: the mismatched model loads without error but its features are different.
    x = images(2, 64, seed=7)
    # (a correct load agrees to 1e-5; with these small random weights the gap is still 10x that)
    assert (gelu_model.encode_image(x) - jit_load(path).encode_image(x)).abs().max() > 1e-4

    gelu_vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=64, embed_dim=128,
                                 depth=2, num_heads=2, num_classes=96)
    with pytest.warns(QuickGELUMismatchWarning, match=r"timm: a '\*_clip_quickgelu_\*' model"):
        load_openai_weights(gelu_vit, state_dict)
    with pytest.raises(ValueError, match="trained with QuickGELU but the model"):
        check_quick_gelu(gelu_vit, expected=True, strict=True)
    # Weights trained with GELU (quick_gelu=False) in a QuickGELU model are caught the other way round.
    with pytest.warns(QuickGELUMismatchWarning, match="trained with GELU but the model"):
        load_openai_weights(make_openai_clip(), state_dict, quick_gelu=False)


# ---------------------------------------------------------------- finding the file


def test_resolve_openai_weights(tmp_path, monkeypatch):
    for name in ("ViT-B-32.pt", "ViT-L-14-336px.pt"):
        (tmp_path / name).write_bytes(b"")
    for name in ("ViT-B/32", "ViT-B-32", "vit-b-32.pt", "ViT-B-32-quickgelu"):
        assert resolve_openai_weights(name, tmp_path) == tmp_path / "ViT-B-32.pt"
    for name in ("ViT-L/14@336px", "ViT-L/14-336", "ViT-L-14-336px"):
        assert resolve_openai_weights(name, weights_dir=str(tmp_path)) == tmp_path / "ViT-L-14-336px.pt"
    existing = tmp_path / "my_clip.pt"
    existing.write_bytes(b"")
    assert resolve_openai_weights(existing) == existing
    monkeypatch.setenv("MUSE_PYRAMID_CLIP_DIR", str(tmp_path))
    assert resolve_openai_weights("ViT-B/32") == tmp_path / "ViT-B-32.pt"

    with pytest.raises(FileNotFoundError, match=r"expected OpenAI's 'ViT-B-16.pt' for 'ViT-B/16' at .*ViT-B-16.pt"):
        resolve_openai_weights("ViT-B/16")
    monkeypatch.delenv("MUSE_PYRAMID_CLIP_DIR")
    with pytest.raises(FileNotFoundError, match="expected the file 'ViT-B-32.pt'.*MUSE_PYRAMID_CLIP_DIR"):
        resolve_openai_weights("ViT-B/32")
    with pytest.raises(ValueError, match="name_or_path='ViT-H/14' is neither an existing file nor"):
        resolve_openai_weights("ViT-H/14", tmp_path)
