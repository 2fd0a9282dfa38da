"""Batch b + 1 prepared while batch b computes: a background thread and, on CUDA, a side stream.

Stage 1 with ``--gpu_decode`` does two kinds of work per batch: preparing it (wait for the loader's file
bytes, decode the JPEGs, resize, crop, normalize) and computing it (forward pass, head-only backward,
copy of the results to the host). ``Prefetch`` runs ``prepare`` for the coming batches in a background
thread, up to ``depth`` batches ahead, each on the side stream of ``streams``; the consumer receives
batch b only after its stream waited for batch b's event. The GPU then decodes batch b + 1 while it
computes batch b, and the host-side work of both (Python, the decoder's own CPU phase) overlaps too.

Correctness across streams: every tensor of a prepared batch is handed to the consumer's stream
(``record_stream``), so the caching allocator never gives its memory to the side stream again before
the consumer's kernels that read it are done; the producer waits for its batch's event before it
takes the next one, so the inputs of a batch (pinned file bytes, decoder buffers) outlive its kernels.
The arithmetic per image is the same as without the thread (same kernels, same order), so the results
are identical to calling ``prepare`` batch by batch.

The streams are an object (``streams_for(device)``) so that the logic runs on the CPU with ``NoStreams``.
"""
import contextlib
import queue
import threading

import torch


class NoStreams:
    """The CPU stand-in: no side stream and no events (CPU work is ordered by the host)."""

    def thread_setup(self):
        pass

    def side(self):
        return contextlib.nullcontext()

    def record(self):
        return None

    def finish(self, event):
        pass

    def hand_over(self, event, tensors):
        pass


class CudaStreams:
    """A side stream on ``device`` for the producer; events hand its batches to the consumer's stream."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def thread_setup(self):
        torch.cuda.set_device(self.device)  # the current card is per thread

    def side(self):
        return torch.cuda.stream(self.stream)

    def record(self):
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def finish(self, event):
        event.synchronize()

    def hand_over(self, event, tensors):
        main = torch.cuda.current_stream(self.device)
        main.wait_event(event)
        for t in tensors:
            t.record_stream(main)


def streams_for(device):
    """``CudaStreams`` on a CUDA device, else ``NoStreams``."""
    return CudaStreams(device) if torch.device(device).type == "cuda" else NoStreams()


def device_tensors(obj):
    """The CUDA tensors in ``obj`` (a tensor, or a tuple / list of values)."""
    items = obj if isinstance(obj, (tuple, list)) else (obj,)
    return [t for t in items if torch.is_tensor(t) and t.device.type == "cuda"]


class Prefetch:
    """Iterates over ``prepare(batch)`` for the batches of ``loader``, in order, computed by a background
    thread up to ``depth`` batches ahead (see the module docstring). An exception of the loader or of
    ``prepare`` is raised by the iteration at that batch. ``close()`` stops the thread (also after an
    error in the consumer); use as a context manager."""

    def __init__(self, loader, prepare, streams, depth=2):
        self.streams = streams
        self.queue = queue.Queue(maxsize=max(1, depth))
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(loader, prepare), name="stage1-prefetch",
                                       daemon=True)
        self.thread.start()

    def _put(self, item):
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, loader, prepare):
        try:
            self.streams.thread_setup()
            for batch in loader:
                if self.stopping.is_set():
                    return
                with self.streams.side():
                    out = prepare(batch)
                    event = self.streams.record()
                self.streams.finish(event)
                del batch
                if not self._put(("batch", out, event)):
                    return
            self._put(("end", None, None))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised there
            self._put(("error", e, None))

    def __iter__(self):
        while True:
            kind, out, event = self.queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise out
            self.streams.hand_over(event, device_tensors(out))
            yield out

    def close(self, timeout=10.0):
        """Stop the producer and wait (at most ``timeout`` s) for its thread to end."""
        self.stopping.set()
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        self.thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
