"""Device profiles and the modelled energy and latency that `slicemoe run` and `slicemoe sim` report."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli, run_json

from slicemoe_gguf import energy
from slicemoe_gguf.model_info import describe

PROMPT = "Once upon a time there was a small village by the sea"


@pytest.fixture(scope="module")
def sliced(sliced_gguf):
    return sliced_gguf("olmoe")


@pytest.mark.parametrize("name", ["phone", "laptop"])
def test_every_number_of_a_builtin_profile_names_its_source(name):
    profile = energy.load_profile(name)
    assert set(profile.sources) == {"flash_read_bandwidth", "flash_read_energy", "dram_bandwidth", "dram_energy",
                                    "mac_energy"}
    assert all(len(source) > 20 for source in profile.sources.values())
    # the premise of the whole project: a byte from flash costs more time and energy than one from RAM
    assert profile.flash_read_energy > profile.dram_energy
    assert profile.flash_read_bandwidth < profile.dram_bandwidth


def test_a_profile_without_a_source_is_refused(tmp_path):
    data = json.loads((energy.PROFILE_DIR / "phone.json").read_text())
    del data["dram_energy"]["source"]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'dram_energy' has no 'source'"):
        energy.load_profile(path)
    with pytest.raises(ValueError, match="unknown device profile 'tablet'"):
        energy.load_profile("tablet")


def test_modelled_cost_is_the_documented_formula_over_the_counters():
    phone = energy.load_profile("phone")
    stats = {"decode_tokens": 10, "flash_bytes": 4_200_000, "ram_bytes": 51_200_000, "msb_hits": 30, "msb_misses": 10}
    got = energy.per_token(stats, phone, msb_slice_bytes=20 * 1000, compute_ms=2.0)
    # 420 kB of flash and 5.12 MB of RAM per token; 40 uses of 32,000-weight experts over 10 tokens
    assert got["flash_mj_per_token"] == pytest.approx(420_000 * 4.17e-10 * 1e3)
    assert got["dram_mj_per_token"] == pytest.approx(5_120_000 * 1.625e-10 * 1e3)
    assert got["expert_macs_per_token"] == pytest.approx(4 * 32_000)
    assert got["energy_mj_per_token"] == pytest.approx(
        got["flash_mj_per_token"] + got["dram_mj_per_token"] + 4 * 32_000 * 2.3e-13 * 1e3)
    assert got["latency_ms_per_token"] == pytest.approx(0.1 + 0.1 + 2.0)


def test_run_json_reports_each_profile_from_its_own_counters(sliced):
    total = describe(sliced)["expert_msb_bytes"] + describe(sliced)["expert_lsb_bytes"]
    result = run_json("run", "-m", str(sliced), "-p", PROMPT, "-n", "12", "--ignore-eos", "--json",
                      "--cache-budget", f"{total // 2}B")
    assert set(result["modelled"]) == {"phone", "laptop"}
    msb_slice = max(layer["msb_bytes_per_expert"] for layer in describe(sliced)["layers"])
    for name, modelled in result["modelled"].items():
        expected = energy.per_token(result["cache"], energy.load_profile(name), msb_slice)
        assert modelled["energy_mj_per_token"] == pytest.approx(expected["energy_mj_per_token"])
        assert modelled["compute_ms_per_token"] > 0


def test_sim_models_less_flash_energy_for_fewer_flash_bytes(sliced, tmp_path):
    trace = tmp_path / "t.jsonl"
    run_cli("trace", "-m", str(sliced), "-p", PROMPT, "-n", "24", "--ignore-eos", "-o", str(trace))
    small = run_json("sim", str(trace), "--policy", "lru8", "--cache-budget", "60%", "--profile", "phone", "--json")
    large = run_json("sim", str(trace), "--policy", "lru8", "--cache-budget", "100%", "--profile", "phone", "--json")
    assert set(small["modelled"]) == {"phone"}
    assert large["flash_bytes"] < small["flash_bytes"]
    assert large["modelled"]["phone"]["flash_mj_per_token"] < small["modelled"]["phone"]["flash_mj_per_token"]


def test_sim_refuses_an_unknown_profile_before_replaying(sliced, tmp_path):
    trace = tmp_path / "t.jsonl"
    run_cli("trace", "-m", str(sliced), "-p", PROMPT, "-n", "4", "--ignore-eos", "-o", str(trace))
    proc = run_cli("sim", str(trace), "--cache-budget", "50%", "--profile", "tablet", check=False)
    assert proc.returncode == 1
    assert "unknown device profile 'tablet'; built in: laptop, phone" in proc.stderr
    assert proc.stdout == ""
