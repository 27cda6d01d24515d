"""Host syncs of a training step: the plan reads the host batch, the losses and the gradient norm stay on the
device, and one read per optimizer step brings the step's numbers to the host.

On CPU every tensor is a host tensor, so the spy models the device: a tensor holds *device values* when it
shares storage with a parameter, when it is what ``.to(device)`` returned (a copy, so that the host tensor it
came from stays a host tensor), or when an op computed it from device values. A *host read* is what would
make the host wait for the device: a ``.cpu()``, ``.tolist()``, ``.item()``/``int()``/``float()``/``bool()``
(``aten._local_scalar_dense``), or an op whose output size depends on the values (``nonzero``, boolean-mask
indexing) on device values. Not modelled: tensors made on the device by factories (``torch.zeros(...,
device=d)``) count as device values only once an op mixes them with device values.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastnest.train import trainer
from fastnest.train.cli import main
from tests.train_helpers import cli_args, save_tiny_model

aten = torch.ops.aten
# Ops whose result the host needs before it can go on (a value, or a size that depends on the values).
VALUE_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class DeviceValueSpy(TorchDispatchMode):
    """Records the host reads of device values (see the module docstring) while active."""

    def __init__(self, seeds: list[torch.Tensor]) -> None:
        super().__init__()
        self.storages: set[int] = set()
        self.keep: list[torch.Tensor] = []  # device values stay alive: no storage address is reused meanwhile
        self.reads: list[str] = []
        for t in seeds:
            self.mark(t)

    def mark(self, t: torch.Tensor) -> None:
        if t.untyped_storage().data_ptr():
            self.storages.add(t.untyped_storage().data_ptr())
            self.keep.append(t)

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages

    def read(self, what: str) -> None:
        self.reads.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        device_in = any(self.on_device(t) for t in leaves)
        if device_in and func in VALUE_OPS:
            self.read(str(func))
        if device_in and func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.read("boolean-mask index")
        out = func(*args, **kwargs)
        if device_in:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark(t)
        return out


def spied(monkeypatch, spy: DeviceValueSpy):
    """``.to(device)`` gives device values, ``.cpu()``/``.tolist()`` of device values are host reads."""
    to, cpu, tolist = torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.tolist

    def spy_to(self, *args, **kwargs):
        names_device = "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args)
        out = to(self, *args, **kwargs)
        if names_device and out.device.type == "cpu":
            out = out.clone() if out is self else out  # the device copy is not the host tensor
            spy.mark(out)
        return out

    def spy_cpu(self, *args, **kwargs):
        if spy.on_device(self):
            spy.read(".cpu()")
            host = cpu(self, *args, **kwargs).clone()
            spy.storages.discard(host.untyped_storage().data_ptr())  # the host copy holds host values
            return host
        return cpu(self, *args, **kwargs)

    def spy_tolist(self):
        if spy.on_device(self):
            spy.read(".tolist()")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    monkeypatch.setattr(torch.Tensor, "cpu", spy_cpu)
    monkeypatch.setattr(torch.Tensor, "tolist", spy_tolist)


def test_the_spy_sees_host_reads_of_device_values(monkeypatch):
    """The spy itself: each kind of host read of a device value is seen once, host values never."""
    weight = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    host = torch.tensor([1.0, -2.0, 3.0])
    spy = DeviceValueSpy([weight])
    with monkeypatch.context() as m:
        spied(m, spy)
        with spy:
            y = weight @ host.to("cpu")  # device values
            float(host.sum()), host.tolist(), host[host > 0], host.cpu()  # host: not reads
            float(y.sum())
            y.tolist()
            y[y > 0]
            bool((y > 0).any())
            float(y.cpu()[0])  # a read of the host copy is not one
    assert spy.reads == [
        "aten._local_scalar_dense.default",
        ".tolist()",
        "boolean-mask index",
        "aten._local_scalar_dense.default",
        ".cpu()",
    ]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_one_host_read_per_optimizer_step(tmp_path, tiny_dir, monkeypatch):
    """Step 1 of the tiny model (2 micro-batches): one host read, the step's numbers (losses, tokens, gradient
    norm) in one ``.tolist()``. Before (the batch moved to the device and planned from a ``.cpu()`` copy, the
    losses ``.cpu()``'d per micro-batch, the norm read alone, the loss targets checked on the device) this step
    read 15 times."""
    forward_backward, finish_step = trainer.forward_backward, trainer.finish_step
    spies: list[DeviceValueSpy] = []

    def spied_step(run, step, *a):
        if step > 0:
            return forward_backward(run, step, *a)
        spies.append(DeviceValueSpy([*run.model.parameters(), *run.model.buffers()]))
        with monkeypatch.context() as m:
            spied(m, spies[0])
            with spies[0]:
                return forward_backward(run, step, *a)

    def spied_finish(run, apply):
        with monkeypatch.context() as m:
            spied(m, spies[0])
            with spies[0]:
                finish_step(run, apply)

    # The torch cross-entropy chunks (device-agnostic code, like Triton's on CUDA): the default CPU backend,
    # the native kernel, checks its targets on the host it runs on.
    monkeypatch.setattr(trainer, "patch", functools.partial(trainer.patch, backend="torch"))
    monkeypatch.setattr(trainer, "forward_backward", spied_step)
    monkeypatch.setattr(trainer, "finish_step", spied_finish)
    assert main(["train", *cli_args(tiny_dir, tmp_path / "run", 1, 2, "--grad-accum", "2")]) == 0
    assert spies[0].reads == [".tolist()"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts the real synchronising calls")
def test_one_synchronising_call_per_optimizer_step_on_cuda(tmp_path, tiny_dir, monkeypatch):
    """On CUDA, ``torch.cuda.set_sync_debug_mode`` warns at every synchronising call: step 2 (step 1 also warms
    up lazily made state) warns once, for the read of the step's numbers."""
    forward_backward, finish_step = trainer.forward_backward, trainer.finish_step
    caught: list[str] = []

    def watched(fn):
        def call(run, *a):
            if run.scheduler.last_epoch != 1:
                return fn(run, *a)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return fn(run, *a)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    caught.extend(str(w.message) for w in seen if "synchroniz" in str(w.message))

        return call

    monkeypatch.setattr(trainer, "forward_backward", watched(forward_backward))
    monkeypatch.setattr(trainer, "finish_step", watched(finish_step))
    args = cli_args(tiny_dir, tmp_path / "run", 2, 2, "--grad-accum", "2", "--device", "cuda")
    assert main(["train", *args]) == 0
    assert len(caught) == 1, caught
