"""Which face of each frame stands for the utterance: the most confident one, or the active speaker.

Active speaker (``face="speaker"``): faces are linked across the utterance's sampled frames into
tracks (nearest centre of the previous observation, within one face size); the track whose aligned
crop changes most in its lower half (the mouth) from frame to frame is taken as the speaker's. Tracks
seen in one frame only cannot show motion; when no track has two frames, the most confident face of
each frame is used.
"""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.features.visual import FaceObs


def most_confident(frames: list[list[FaceObs]]) -> list[FaceObs]:
    """One face per frame that has any: the highest MTCNN probability."""
    return [max(faces, key=lambda o: o.prob) for faces in frames if faces]


def face_tracks(frames: list[list[FaceObs]]) -> list[list[FaceObs]]:
    """Greedy tracking by centre distance (fractions of the frame); each track in time order."""
    tracks: list[list[FaceObs]] = []
    for faces in frames:
        taken: set[int] = set()
        for obs in faces:
            best, best_d = None, float("inf")
            for t, track in enumerate(tracks):
                last = track[-1]
                d = float(np.hypot(obs.centre[0] - last.centre[0], obs.centre[1] - last.centre[1]))
                if t not in taken and last.frame < obs.frame and d < max(obs.size, last.size) and d < best_d:
                    best, best_d = t, d
            if best is None:
                tracks.append([obs])
                taken.add(len(tracks) - 1)
            else:
                tracks[best].append(obs)
                taken.add(best)
    return tracks


def mouth_motion(track: list[FaceObs]) -> float:
    """Mean absolute change of the crop's lower half between consecutive observations."""
    lower = [o.crop[o.crop.shape[0] // 2 :] for o in track]
    return float(np.mean([np.abs(b - a).mean() for a, b in pairwise(lower)]))


def choose_faces(frames: list[list[FaceObs]], mode: str) -> list[FaceObs]:
    """The faces (time order, at most one per frame) that represent one utterance."""
    if mode == "confident" or all(len(faces) <= 1 for faces in frames):
        return most_confident(frames)
    tracks = [t for t in face_tracks(frames) if len(t) > 1]
    if not tracks:
        return most_confident(frames)
    return max(tracks, key=mouth_motion)
