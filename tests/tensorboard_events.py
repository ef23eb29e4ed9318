"""Reads TensorBoard event files back without TensorBoard (the tests' view of the sink)."""

import glob
import os
import struct


def read_scalars(workdir):
  """Every scalar of the event files in ``workdir``: tag -> [(step, value), ...] in file order.

  TFRecord framing: uint64 length, uint32 length crc, payload (an ``Event``), uint32 payload
  crc. The hparams plugin's own summaries (``_hparams_/...``) are left out.
  """
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(glob.glob(os.path.join(str(workdir), "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value") and not value.tag.startswith("_hparams_"):
          out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return out
