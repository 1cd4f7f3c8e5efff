"""Replays a job recorded on a terminal and compares the ETA it showed with the time the job really took.

    script -q --timing=tm -c "pidray upscale pipeline/assets/samples out --overwrite" ts
    python tests/eta_replay.py ts tm

Every frame of the job bar from the moment the second image's tile-steps start (until the work reaches 100%) is
listed with its ETA, the real time left (to the summary line) and the error; the last line is the worst error. An
ETA of "<1s" claims less than a second: its error is how far past one second the job really ran.
"""

import re
import sys


def seconds(text: str) -> float:
    """The bar's ETA text: 12.3s, 4m05s or 1h02m ("<1s": 1, the bound it claims)."""
    if text == "<1s":
        return 1.0
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?([\d.]+)?s?", text)
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return 3600 * h + 60 * mi + s


def main(ts: str, timing: str) -> None:
    data = open(ts, "rb").read()
    pos, t, events = data.index(b"\n") + 1, 0.0, []  # the recording starts after script's header line
    for line in open(timing):
        delay, n = line.split()
        t += float(delay)
        events.append((t, pos, pos + int(n)))
        pos += int(n)

    def when(i: int) -> float:
        return next(t for t, a, b in events if a <= i < b)

    end = when(data.index(b"done:"))
    images = [(m.start(), m.group(1)) for m in re.finditer(rb"  (\S+) \[[#-]+\] \d+/\d+ tile-steps", data)]
    second = next(p for p, name in images if name != images[0][1])
    worst = 0.0
    for m in re.finditer(rb"upscale \[[#-]+\] +(\d+)%  \d+/\d+ images  ETA (<1s|[\dhms.]+)", data):
        at, pct = when(m.start()), int(m.group(1))
        if m.start() < second or pct >= 100:
            continue
        text, real = m.group(2).decode(), end - at
        eta = seconds(text)
        error = max(0.0, real - eta) / real if text == "<1s" else abs(eta - real) / real
        worst = max(worst, error)
        print(f"t={at:6.1f}s {pct:3d}%  ETA {text:>6s}  real {real:6.1f}s  error {100 * error:4.0f}%")
    print(f"job {end:.1f}s; worst ETA error from the second image on: {100 * worst:.0f}%")


if __name__ == "__main__":
    main(*sys.argv[1:3])
