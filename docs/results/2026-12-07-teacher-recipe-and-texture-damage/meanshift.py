"""Where a model's change to a clean held-out photo lies: a shift of its mean, low frequencies or fine detail.
Each of scikit-image's greyscale photos the held-out set uses, resized to 192 x 192 (a square: `shards heldout`
keeps the aspect ratio, so page, coins and text are stretched here)."""
import sys
import numpy as np, torch, skimage.data as sd
from skimage.transform import resize
from scipy import ndimage
from weatherkd.models import load
models = {k: load(v).eval() for k, v in (a.split('=') for a in sys.argv[1:])}
def db(err): return 10 * np.log10(1 / np.mean(err ** 2))
print('| photo | model | clean-in PSNR | mean shift (/255) | PSNR of the change below σ 3 px | above σ 3 px |')
print('|---|---|---|---|---|---|')
for n in ['brick', 'grass', 'gravel', 'camera', 'page', 'coins', 'moon', 'text']:
    g = resize(getattr(sd, n)().astype(np.float32) / 255, (192, 192), anti_aliasing=True)
    x = np.stack([g] * 3, -1)
    for name, m in models.items():
        with torch.no_grad():
            y = m(torch.from_numpy(x).permute(2, 0, 1)[None].float()).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        d = y - x
        lo = ndimage.gaussian_filter(d, (3, 3, 0))
        print(f'| {n} | {name} | {db(d):.1f} | {255 * d.mean():+.1f} | {db(lo):.1f} | {db(d - lo):.1f} |')
