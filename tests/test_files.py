"""Reading user files: latent files with what travels with them, precomputed text embeddings; tensors only."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pid_core.errors import LatentError, TextEmbeddingError
from pid_core.files import load_latent_file, load_text_embedding


def test_latent_file_and_its_sigma(tmp_path):
    latent = torch.randn(2, 16, 3, 4)
    save_file({"latent": latent, "pid_sigma": torch.tensor([0.2, 0.4])}, tmp_path / "l.safetensors")
    got, meta = load_latent_file(str(tmp_path / "l.safetensors"))
    assert torch.equal(got, latent) and meta.sigma.tolist() == pytest.approx([0.2, 0.4])
    assert meta.source == "l.safetensors"
    save_file({"latent_tensor": latent}, tmp_path / "c.latent")  # ComfyUI's Save Latent
    got, meta = load_latent_file(str(tmp_path / "c.latent"))
    assert torch.equal(got, latent) and meta.sigma is None
    np.save(tmp_path / "n.npy", latent.numpy())
    assert torch.equal(load_latent_file(str(tmp_path / "n.npy"))[0], latent)
    with pytest.raises(LatentError, match="not found"):
        load_latent_file(str(tmp_path / "missing.safetensors"))
    save_file({"a": latent, "b": latent.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(LatentError, match="one latent tensor"):
        load_latent_file(str(tmp_path / "two.safetensors"))


class _NotATensor:  # pickled by torch.save; weights_only loading must refuse it
    pass


def test_load_text_embedding_round_trips(tmp_path):
    emb = torch.randn(1, 300, 32)
    save_file({"anything": emb}, tmp_path / "a.safetensors")
    assert torch.equal(load_text_embedding(tmp_path / "a.safetensors"), emb)
    save_file({"text_embedding": emb, "mask": torch.ones(1, 300)}, tmp_path / "b.safetensors")
    assert torch.equal(load_text_embedding(tmp_path / "b.safetensors"), emb)
    np.save(tmp_path / "c.npy", emb.numpy())
    assert torch.equal(load_text_embedding(tmp_path / "c.npy"), emb)
    torch.save(emb, tmp_path / "d.pt")
    assert torch.equal(load_text_embedding(tmp_path / "d.pt"), emb)
    torch.save({"text_embedding": emb}, tmp_path / "e.pth")
    assert torch.equal(load_text_embedding(tmp_path / "e.pth"), emb)


def test_load_text_embedding_errors(tmp_path):
    torch.save({"text_embedding": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(TextEmbeddingError, match="pickled"):
        load_text_embedding(tmp_path / "evil.pt")
    np.save(tmp_path / "obj.npy", np.array([_NotATensor()], dtype=object), allow_pickle=True)
    with pytest.raises(TextEmbeddingError):
        load_text_embedding(tmp_path / "obj.npy")
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.safetensors")
    with pytest.raises(TextEmbeddingError, match="text_embedding"):
        load_text_embedding(tmp_path / "two.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TextEmbeddingError, match="Could not read"):
        load_text_embedding(tmp_path / "junk.safetensors")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(TextEmbeddingError, match="unsupported"):
        load_text_embedding(tmp_path / "x.txt")
    with pytest.raises(TextEmbeddingError, match="not found"):
        load_text_embedding(tmp_path / "missing.pt")
