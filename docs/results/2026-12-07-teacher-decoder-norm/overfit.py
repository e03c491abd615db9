# The overfit measurement of 2026-12-07-teacher-decoder-norm.md: each net fits the same 4 training
# batches (crop 64, batch 8) with AdamW and L1, one thread; prints the loss (mean of the last 4
# steps) every 100 steps. Usage: python overfit.py student teacher transweather lr noinit norm real
import torch, time, sys
torch.set_num_threads(1)
from weatherkd import models
from weatherkd.data.stream import TrainSpec, train_loader
torch.manual_seed(0)
spec = TrainSpec(crop=64, batch_size=8)
ld = train_loader("/work/exp/shards/demo", "train", None, spec, 0, 0, 1, 4, 0)
batches = [{k: (v.float()/255 if k in ("input","target") else v) for k,v in b.items()} for b in ld.epoch(0, 0)]
print(batches[0].keys() if isinstance(batches[0], dict) else type(batches[0]))
def trial(name, net, call, lr=2e-3, steps=600):
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    t = time.time(); hist = []; run = []
    for i in range(steps):
        b = batches[i % len(batches)]
        out = call(net, b["input"])
        loss = (out - b["target"]).abs().mean()
        opt.zero_grad(); loss.backward(); opt.step()
        run.append(loss.item())
        if i % 100 == 99: hist.append(round(sum(run[-4:])/4, 4))
    idl = sum((b["input"] - b["target"]).abs().mean().item() for b in batches)/len(batches)
    print(name, "identity L1", round(idl,4), hist, f"{time.time()-t:.0f}s", flush=True)
which = sys.argv[1:]
LRS = (1e-4, 2.5e-4)
if "teacher" in which:
    prior = torch.zeros(8, 64)
    trial("clipweather tiny", models.build("clipweather_net", size="tiny", prior_dim=64, text_dim=64), lambda n, x: n(x, prior[:x.shape[0]]))
if "transweather" in which:
    trial("transweather tiny", models.build("transweather", size="tiny"), lambda n, x: n(x))
if "student" in which:
    trial("unet_bn tiny", models.build("unet_bn", size="tiny"), lambda n, x: n(x))
if "lr" in which:
    for lr in LRS:
        torch.manual_seed(0)
        trial(f"clipweather tiny lr {lr}", models.build("clipweather_net", size="tiny", prior_dim=64, text_dim=64), lambda n, x: n(x, torch.zeros(x.shape[0], 64)), lr=lr, steps=400)
if "noinit" in which:
    torch.manual_seed(0)
    net = models.build("clipweather_net", size="tiny", prior_dim=64, text_dim=64)
    torch.nn.init.normal_(net.head[-1].weight, std=1e-3)
    trial("clipweather tiny head init 1e-3", net, lambda n, x: n(x, torch.zeros(x.shape[0], 64)), steps=400)
if "norm" in which:
    from torch import nn
    import weatherkd.models.clipweather as CW
    def conv_norm(cin, cout, kind):
        n = nn.GroupNorm(1, cout) if kind == "gn" else nn.BatchNorm2d(cout)
        return [nn.Conv2d(cin, cout, 3, padding=1), n, nn.GELU()]
    for kind in ("bn", "gn"):
        class DS(nn.Module):
            def __init__(self, i, s, o):
                super().__init__(); self.conv = nn.Sequential(*conv_norm(i + s, o, kind), *conv_norm(o, o, kind))
            def forward(self, x, skip):
                x = torch.nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
                return self.conv(torch.cat([x, skip], 1))
        CW.DecoderStep = DS
        torch.manual_seed(0)
        net = CW.ClipWeatherNet(size="tiny", prior_dim=64, text_dim=64)
        dec = 16
        net.stem = nn.Sequential(*conv_norm(3, dec, kind))
        net.head = nn.Sequential(*conv_norm(32, dec, kind), *conv_norm(dec, dec, kind), *conv_norm(dec, dec, kind), nn.Conv2d(dec, 3, 3, padding=1))
        nn.init.zeros_(net.head[-1].weight); nn.init.zeros_(net.head[-1].bias)
        for lr in (2e-3, 5e-4):
            import copy
            trial(f"clipweather tiny {kind} lr {lr}", copy.deepcopy(net), lambda n, x: n(x, torch.zeros(x.shape[0], 64)), lr=lr, steps=400)
if "real" in which:
    for lr in (2e-3, 5e-4):
        torch.manual_seed(0)
        trial(f"clipweather tiny decoder_norm=batch lr {lr}", models.build("clipweather_net", size="tiny", prior_dim=64, text_dim=64, decoder_norm="batch"), lambda n, x: n(x, torch.zeros(x.shape[0], 64)), lr=lr, steps=400)
