"""A worker whose device the conversion cannot use fails the job with the options' error code,
as every other option error does, and leaves nothing behind."""
from pathlib import Path

import pytest
import torch

from shared.jobs import JobState
from worker.tasks import run_job


def config_only(url, dest: Path, limits, progress=None, on_config=None, on_weights=None):
    (dest / "config.json").write_text('{"model_type": "gpt2"}')  # the device is refused before it is read
    return dest


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device, message", [("cuda", "torch sees no CUDA device"),
                                             ("gpu", "device must be cpu, cuda or cuda:N")])
def test_a_device_the_conversion_cannot_use_fails_the_job_with_invalid_options(store, storage, settings, device,
                                                                               message):
    job, _ = store.create("https://example.org/m/", None)
    # the real conversion (convert=None): it resolves the device before any work
    assert run_job(job.id, settings=settings, store=store, storage=storage, device=device,
                   fetch=config_only) == JobState.failed
    done = store.get(job.id)
    assert done.error.code == "invalid_options" and message in done.error.message
    assert not (Path(settings.work_dir) / job.id).exists()
