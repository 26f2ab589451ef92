"""Reading a run's TensorBoard event files back in tests, without TensorBoard itself."""

import os
import struct


def scalars(workdir):
    """(tag, step, value) of every scalar in `workdir/tensorboard`'s event files.

    The files are TFRecord framing around Event protos: an 8-byte length, a 4-byte CRC of it,
    the record, a 4-byte CRC of the record.
    """
    from tensorboardX.proto import event_pb2

    out = []
    folder = os.path.join(workdir, "tensorboard")
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
            at += 12 + length + 4
    return out
