"""Decoding videos: one interface over PyAV and torchcodec, and the raw samples of video shards.

A video is opened from its bytes by a backend and gives a ``VideoSource``: its ``info``
(``VideoInfo``: frame count, size, rate, codec) and ``get_frames(indices)``, the RGB frames at
those indices as a uint8 tensor ``[T, H, W, 3]``, decoding no more than it must.

Backends (``video_backend(name)``):

* ``"pyav"``: PyAV (the ``[video]`` extra; its wheels bundle FFmpeg, so nothing is needed from the
  system). It demuxes the packets (cheap: no decoding), numbers the frames in presentation order
  by their timestamps, and decodes from the last keyframe at or before each wanted frame, skipping
  every group of pictures that holds no wanted frame.
* ``"torchcodec"``: torchcodec's ``VideoDecoder`` (exact seek mode), on the CPU or — ``device="cuda"``
  — NVDEC; used only when ``torchcodec`` imports with a working FFmpeg.
* ``"auto"`` (default): torchcodec when it works, else PyAV.

``decode_video_sample`` turns a raw WebDataset sample (``KEY.mp4`` — or another container
extension of ``VIDEO_KEYS`` — plus ``KEY.txt`` / ``KEY.cls`` / ``KEY.json``: what ``python -m
data.make_shards`` writes for videos and what video2dataset writes) into an opened video, a
label and a caption. A video that does not decode, has no video stream or a codec no decoder
here supports raises ``VideoDecodeError`` (a ``data.decode.DecodeError``: ``SkipCounter`` skips,
counts and names it like a corrupt image); ``reason`` says which.
"""

from __future__ import annotations

import bisect
import io
import json
from dataclasses import dataclass
from typing import Sequence

import torch

from .decode import DecodeError

#: File extensions recognised as videos in source folders (lower case).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".ogv", ".mpg", ".mpeg")

#: Sample keys that can hold the video, in order of preference (video2dataset writes ``mp4``).
VIDEO_KEYS = tuple(ext[1:] for ext in VIDEO_EXTENSIONS)

BACKENDS = ("auto", "pyav", "torchcodec")

#: Why a video was skipped (``VideoDecodeError.reason``).
REASONS = ("undecodable", "no_video", "unsupported_codec", "too_short", "no_video_member")

_REENCODE = "re-encode it to H.264 (ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4)"


class VideoDecodeError(DecodeError):
    """A video sample that cannot be used; ``reason`` is one of ``REASONS``, ``sample_id`` ``"shard#key"``."""

    def __init__(self, message: str, sample_id: str = "", reason: str = "undecodable"):
        super().__init__(message, sample_id)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    """What is known of a video before any frame is decoded."""

    num_frames: int
    height: int
    width: int
    fps: float  #: average frame rate (0.0 when unknown)
    codec: str

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``, as PIL gives an image's size."""
        return self.width, self.height


class VideoSource:
    """An opened video: ``info`` and ``get_frames(indices) -> uint8 [len(indices), H, W, 3]``.

    Indices count frames in presentation order from 0 and may repeat or come in any order; the
    frames come back in the order asked. ``name`` (``"shard#key"`` or a path) is in every error.
    """

    name: str
    info: VideoInfo

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.info.num_frames]
        if bad:
            raise IndexError(f"frame {bad[0]} is outside video {self.name} ({self.info.num_frames} frames)")
        if not indices:
            return torch.empty(0, self.info.height, self.info.width, 3, dtype=torch.uint8)
        try:
            return self._get_frames(indices)
        except VideoDecodeError:
            raise
        except Exception as exn:  # FFmpeg's errors come in many types
            raise VideoDecodeError(f"cannot decode the frames of video {self.name}: {type(exn).__name__}: {exn}",
                                   self.name) from exn

    def _get_frames(self, indices: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release the decoder (also done when the source is garbage-collected)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VideoBackend:
    """Opens videos from their bytes. ``name`` goes into settings that decide what a clip looks like."""

    name: str

    def open(self, data: bytes, name: str = "<video>") -> VideoSource:
        """Open a video; raises ``VideoDecodeError`` (naming ``name``) for what cannot be decoded."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- PyAV


class PyAVSource(VideoSource):
    """A video decoded by PyAV, group of pictures by group of pictures (see the module docstring)."""

    def __init__(self, data: bytes, name: str):
        import av

        self.name = name
        self.frames_decoded = 0  # frames the decoder produced so far: what skipping saves is visible
        try:
            self._container = av.open(io.BytesIO(data), mode="r")
        except Exception as exn:  # av.error.FFmpegError and friends: not a media file we can read
            raise VideoDecodeError(f"cannot open video {name}: {type(exn).__name__}: {exn}; {_REENCODE} or drop it",
                                   name) from exn
        try:
            self._open_stream()
        except BaseException:
            self._container.close()
            raise

    def _open_stream(self) -> None:
        name, container = self.name, self._container
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise VideoDecodeError(f"video {name} has no video stream (it holds {', '.join(kinds)}); drop it from "
                                   "the source", name, "no_video")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoDecodeError(f"video {name}: its codec is not supported by the FFmpeg in PyAV's wheel (no "
                                   f"decoder); {_REENCODE}", name, "unsupported_codec")
        self._stream, self._ctx = stream, stream.codec_context
        try:
            # Demuxing reads packet headers only (no decoding): it gives the exact frame count,
            # the presentation order and where the keyframes are.
            self._packets = [p for p in container.demux(stream) if p.size > 0]
        except Exception as exn:
            raise VideoDecodeError(f"cannot read video {name}: {type(exn).__name__}: {exn}; {_REENCODE} or drop it",
                                   name) from exn
        if not self._packets:
            raise VideoDecodeError(f"video {name} has a video stream without frames; drop it", name)
        pts = [p.pts for p in self._packets]
        # Timestamps number the frames in presentation order; without them (some AVI files) frames are
        # numbered in the order the decoder gives them, which needs decoding from the start.
        self._by_pts = None not in pts and len(set(pts)) == len(pts)
        if self._by_pts:
            self._frame_pts = sorted(pts)
            keys = [j for j, p in enumerate(self._packets) if p.is_keyframe]
            self._keys = keys if keys and keys[0] == 0 else [0] + keys
            self._key_pts = [self._packets[j].pts for j in self._keys]
            # Keyframes shown out of their decoding order would defeat the search for the one to start from.
            self._by_pts = self._key_pts == sorted(self._key_pts)
        rate = stream.average_rate or stream.guessed_rate
        self.info = VideoInfo(num_frames=len(self._packets), height=int(self._ctx.height), width=int(self._ctx.width),
                              fps=float(rate) if rate else 0.0, codec=str(self._ctx.name))

    def _get_frames(self, indices: list[int]) -> torch.Tensor:
        frames = None
        if self._by_pts:
            try:
                frames = self._decode_by_pts(indices)
            except VideoDecodeError:
                # A decoder that stamps frames other than their packets: number them as they come instead.
                self._by_pts = False
        if frames is None:
            frames = self._decode_in_order(indices)
        return torch.stack([frames[i] for i in indices])

    def _convert(self, frame) -> torch.Tensor:
        return torch.from_numpy(frame.to_ndarray(format="rgb24"))

    def _decode_by_pts(self, indices: list[int]) -> dict[int, torch.Tensor]:
        index_of = {self._frame_pts[i]: i for i in set(indices)}
        got: dict[int, torch.Tensor] = {}
        pos = None  # the next packet the decoder would read; None: not started
        for i in sorted(index_of.values()):
            if i in got:
                continue
            pts = self._frame_pts[i]
            # Frames after the last keyframe at or before this one are decodable from it; a leading
            # frame of an open GOP (shown before its keyframe) is reached from the previous keyframe.
            start = self._keys[max(bisect.bisect_right(self._key_pts, pts) - 1, 0)]
            if pos is None or start > pos:
                self._ctx.flush_buffers()
                pos = start
            while i not in got:
                if pos > len(self._packets):
                    raise VideoDecodeError(f"video {self.name}: frame {i} of {self.info.num_frames} did not decode "
                                           f"(the stream is damaged); {_REENCODE} or drop it", self.name)
                packet = self._packets[pos] if pos < len(self._packets) else None  # None drains the decoder
                pos += 1
                for frame in self._ctx.decode(packet):
                    self.frames_decoded += 1
                    j = index_of.get(frame.pts)
                    if j is not None and j not in got:
                        got[j] = self._convert(frame)
        return got

    def _decode_in_order(self, indices: list[int]) -> dict[int, torch.Tensor]:
        wanted, last = set(indices), max(indices)
        got: dict[int, torch.Tensor] = {}
        self._ctx.flush_buffers()
        n = -1
        for packet in [*self._packets, None]:
            for frame in self._ctx.decode(packet):
                n += 1
                self.frames_decoded += 1
                if n in wanted:
                    got[n] = self._convert(frame)
            if n >= last:
                return got
        raise VideoDecodeError(f"video {self.name}: only {n + 1} of its {self.info.num_frames} frames decode (the "
                               f"stream is damaged); {_REENCODE} or drop it", self.name)

    def decode_all(self) -> int:
        """Decode every frame (no RGB conversion) and return how many decode: a full check of the stream."""
        self._ctx.flush_buffers()
        n = 0
        try:
            for packet in [*self._packets, None]:
                n += len(self._ctx.decode(packet))
        except Exception as exn:  # FFmpeg's errors come in many types
            raise VideoDecodeError(f"video {self.name}: frame {n + 1} of {self.info.num_frames} does not decode "
                                   f"({type(exn).__name__}: {exn}); {_REENCODE} or drop it", self.name) from exn
        self.frames_decoded += n
        return n

    def close(self) -> None:
        self._container.close()


class PyAVBackend(VideoBackend):
    """PyAV (FFmpeg bundled in its wheels): the default, CPU only."""

    name = "pyav"

    def __init__(self):
        problem = pyav_problem()
        if problem:
            raise ImportError(problem)

    def open(self, data: bytes, name: str = "<video>") -> VideoSource:
        return PyAVSource(data, name)


def pyav_problem() -> str | None:
    """None when PyAV imports, else what is missing and how to install it."""
    try:
        import av  # noqa: F401
    except ImportError as exn:
        return f"PyAV is not installed ({exn}); pip install 'sparseformer-bootstrap[video]' (or pip install av)"
    return None


# ----------------------------------------------------------------------------- torchcodec


class TorchCodecSource(VideoSource):
    """A video decoded by torchcodec (exact seek mode: frame indices are exact)."""

    def __init__(self, data: bytes, name: str, device: str):
        from torchcodec.decoders import VideoDecoder

        self.name = name
        try:
            self._decoder = VideoDecoder(data, seek_mode="exact", dimension_order="NHWC", device=device)
            meta = self._decoder.metadata
        except Exception as exn:  # torchcodec raises ValueError/RuntimeError with FFmpeg's message
            text = str(exn).lower()
            reason = "no_video" if "stream" in text and "video" in text else \
                "unsupported_codec" if "codec" in text or "decoder" in text else "undecodable"
            raise VideoDecodeError(f"cannot open video {name} with torchcodec: {type(exn).__name__}: {exn}; "
                                   f"{_REENCODE} or drop it", name, reason) from exn
        if not meta.num_frames:
            raise VideoDecodeError(f"video {name} has a video stream without frames; drop it", name)
        self.info = VideoInfo(num_frames=int(meta.num_frames), height=int(meta.height), width=int(meta.width),
                              fps=float(meta.average_fps or 0.0), codec=str(meta.codec))

    def _get_frames(self, indices: list[int]) -> torch.Tensor:
        return self._decoder.get_frames_at(indices=indices).data


class TorchCodecBackend(VideoBackend):
    """torchcodec on the CPU or (``device="cuda"``) NVDEC; needs torchcodec and an FFmpeg it can load."""

    name = "torchcodec"

    def __init__(self, device: str = "cpu"):
        problem = torchcodec_problem()
        if problem:
            raise ImportError(problem)
        self.device = str(device)

    def open(self, data: bytes, name: str = "<video>") -> VideoSource:
        return TorchCodecSource(data, name, self.device)


def torchcodec_problem() -> str | None:
    """None when torchcodec imports and loads its FFmpeg libraries, else why not."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads libtorchcodec, which loads FFmpeg)
    except Exception as exn:  # ImportError, or RuntimeError/OSError when FFmpeg cannot be loaded
        return f"torchcodec cannot be used ({type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''})"
    return None


def video_backend(name: str = "auto", device: str = "cpu") -> VideoBackend:
    """The backend ``name`` (``"auto"``: torchcodec when it works, else PyAV); ``device`` is torchcodec's.

    Raises:
        ValueError: an unknown name, or a CUDA device asked of PyAV.
        ImportError: the backend asked for cannot be used (saying how to install it).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown video backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "torchcodec" if torchcodec_problem() is None else "pyav"
    if name == "pyav":
        if str(device) != "cpu":
            raise ValueError(f"PyAV decodes on the CPU only, got device {device!r}; use backend 'torchcodec' for "
                             "NVDEC, or device 'cpu'")
        return PyAVBackend()
    return TorchCodecBackend(device)


def available_video_backends() -> dict[str, str | None]:
    """``{"pyav": None | why not, "torchcodec": None | why not}``."""
    return {"pyav": pyav_problem(), "torchcodec": torchcodec_problem()}


# ----------------------------------------------------------------------------- samples


def video_member(sample: dict) -> str | None:
    """The key of the sample's video (the first of ``VIDEO_KEYS`` present), or None."""
    return next((k for k in VIDEO_KEYS if k in sample), None)


def decode_video_sample(sample: dict, backend: VideoBackend) -> dict:
    """Open a raw video sample: ``{"video": VideoSource, "cls": int (-1 if none), "txt": str, "json": dict,
    "__key__", "__url__"}``. The caption is ``KEY.txt``, else the json's ``caption`` (video2dataset keeps it
    there too); ``json`` is ``{}`` when the sample has none.

    Raises:
        VideoDecodeError: no video member, a video that does not open, no video stream, an
            unsupported codec, or a malformed ``cls``/``json`` (naming ``"shard#key"``).
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    sample_id = f"{url}#{key}"
    ext = video_member(sample)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise VideoDecodeError(
            f"sample {key!r} in shard {url} has no video member (it holds {members}; looked for "
            f"{', '.join(VIDEO_KEYS)}): these are not video shards; make them with python -m data.make_shards "
            "VIDEO_FOLDER OUT, or read them as images", sample_id, "no_video_member")
    try:
        label = int(sample["cls"]) if "cls" in sample else -1
        meta = json.loads(sample["json"]) if "json" in sample else {}
        text = sample["txt"].decode("utf-8") if "txt" in sample else str(meta.get("caption") or "")
    except (ValueError, UnicodeDecodeError) as exn:
        raise VideoDecodeError(f"cannot read the label/caption/json of sample {key!r} in shard {url}: {exn}",
                               sample_id) from exn
    video = backend.open(sample[ext], sample_id)
    return {"video": video, "cls": label, "txt": text, "json": meta, "__key__": key, "__url__": url}
