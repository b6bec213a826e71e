"""Policy profiles: the shipped ones load with the rule's figures; broken ones name file, key and reason."""

from __future__ import annotations

import pytest

from schemas.errors import PolicyError
from schemas.policy import load_policy, shipped_policies


def test_shipped_profiles():
    assert set(shipped_policies()) >= {"bis-2024-proposed", "eu-ai-act", "demo"}
    bis = load_policy("bis-2024-proposed")
    assert bis.thresholds.training_ops == 1e26 and bis.thresholds.bio_training_ops == 1e23
    assert bis.thresholds.cluster_ops_per_s == 1e20 and bis.thresholds.cluster_network_gbps == 100
    assert bis.reporting.window_days == 15 and bis.window_seconds == 15 * 86_400
    fp = bis.foreign_person
    assert fp.check_beneficial_owners and fp.owner_min_pct == 25 and fp.owner_control_counts
    assert fp.foreign_reseller_counts and fp.unknown_is_foreign
    assert not bis.demo
    eu = load_policy("eu-ai-act")
    assert eu.thresholds.training_ops == 1e25 and eu.reporting.window_days == 14
    demo = load_policy("demo")
    assert demo.demo and "DEMO" in demo.title and demo.thresholds.training_ops < bis.thresholds.training_ops


def test_every_profile_has_id_version_and_source():
    for name in shipped_policies():
        p = load_policy(name)
        assert p.id == name and p.version and p.source


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('id = "x"\nversion = "1"\ntitle = "t"\n[thresholds]\ntraining_ops = -1\n[reporting]\nwindow_days = 15\n',
         "key thresholds.training_ops: Input should be greater than 0"),
        ('id = "x"\nversion = "1"\ntitle = "t"\n[thresholds]\ntraining_ops = 1e26\n', "key reporting: Field required"),
        ('id = "x"\nversion = "1"\ntitle = "t"\n[thresholds]\ntraining_ops = 1e26\ntypo = 1\n'
         '[reporting]\nwindow_days = 15\n', "key thresholds.typo: Extra inputs are not permitted"),
        ('id = "x"\nversion = \n', "not valid TOML"),
    ],
)
def test_broken_profile_names_file_key_and_reason(tmp_path, text, words):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(path) in str(info.value)
    assert words in str(info.value)


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="no such policy profile"):
        load_policy("nonexistent")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.toml")
