"""The container (issue 30, item 12): the Dockerfile is checked here; the image is built and run
where docker reaches a daemon, and that test is skipped, saying why, where it does not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_dockerfile_copies_what_exists_and_serves_on_every_address():
    text = (ROOT / "Dockerfile").read_text()
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies and all((ROOT / source).exists() for sources in copies for source in sources)
    assert 'ENTRYPOINT ["captioner"]' in text and 'CMD ["serve", "--host", "0.0.0.0"]' in text
    assert "USER captioner" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv*" in ignored and ".git" in ignored and "src" not in ignored


def _docker() -> str:
    docker = shutil.which("docker")
    if not docker:
        pytest.skip("docker is not installed here")
    info = subprocess.run([docker, "info"], capture_output=True, text=True)
    if info.returncode:
        said = (info.stderr.strip().splitlines() or ["no reason given"])[-1]
        pytest.skip(f"docker is installed but reaches no daemon here ({said})")
    return docker


@pytest.mark.slow
def test_the_image_builds_and_captions_a_photo_from_a_volume():
    docker = _docker()
    tag = "captioner-test:latest"
    build = subprocess.run([docker, "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([docker, "run", "--rm", "-v", f"{ROOT / 'examples'}:/photos:ro", tag, "caption",
                          "/photos/chelsea.jpg"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert " cat " in f" {run.stdout} "
