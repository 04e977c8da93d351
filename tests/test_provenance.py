"""tools/provenance.py: the commit stamp says when the tree differs from it, and what it is outside git."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import provenance  # noqa: E402


def _git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_git_commit_marks_uncommitted_changes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert provenance.git_commit(root=str(repo)) == head
    assert provenance.git_commit(short=True, root=str(repo)) == _git(repo, "rev-parse", "--short", "HEAD")
    (repo / "a.txt").write_text("two\n")
    assert provenance.git_commit(root=str(repo)) == head + " (with uncommitted changes)"
    (repo / "untracked.txt").write_text("x\n")  # untracked files alone do not mark the tree
    _git(repo, "checkout", "-q", "a.txt")
    assert provenance.git_commit(root=str(repo)) == head


def test_git_commit_outside_a_checkout(tmp_path):
    assert provenance.git_commit(root=str(tmp_path)) == "unknown"


def test_host_cpu_reads_proc_cpuinfo():
    cpu = provenance.host_cpu()
    if not os.path.exists("/proc/cpuinfo"):
        assert cpu == {}
        return
    with open("/proc/cpuinfo") as f:
        text = f.read()
    assert cpu["cpu_model"] and cpu["cpu_model"] in text
    assert cpu["cpu_isa"] == "" or f" {cpu['cpu_isa']}" in text
