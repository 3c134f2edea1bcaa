"""Print the machine's CPU busy share every half second: time, busy % of all cores."""
import time

def read():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v), idle

t, i = read()
while True:
    time.sleep(0.5)
    t2, i2 = read()
    busy = 100.0 * (1 - (i2 - i) / max(t2 - t, 1))
    print(time.strftime("%Y/%m/%d %H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}, {busy:.0f}",
          flush=True)
    t, i = t2, i2
