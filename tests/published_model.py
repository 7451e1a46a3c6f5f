"""The published FNeVR forward pass as plain functions over a published-layout state dict.

An independent statement of what the authors' inference code computes (vox-256 structure, key names
of `fnevr_official_state_dict.json`), written with torch.nn.functional only, so that the tests can
check our modules + checkpoint renaming against it without any code of theirs. Inputs are kept in
the caller's dtype; BatchNorm layers use their running statistics (eval mode).
"""

import torch
import torch.nn.functional as F


def _conv(sd, name, x, padding=0):
    return F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), padding=padding)


def _bn(sd, name, x):
    return F.batch_norm(
        x,
        sd[f"{name}.running_mean"],
        sd[f"{name}.running_var"],
        sd[f"{name}.weight"],
        sd[f"{name}.bias"],
        training=False,
        eps=1e-5,
    )


def _block(sd, name, x, kind):  # conv-bn-relu, with a 2x nearest upsample before or avg pool after
    if kind == "up":
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    pad = sd[f"{name}.conv.weight"].shape[-1] // 2
    x = F.relu(_bn(sd, f"{name}.norm", _conv(sd, f"{name}.conv", x, pad)))
    return F.avg_pool2d(x, 2) if kind == "down" else x


def _hourglass(sd, prefix, x, n):
    skips = [x]
    for i in range(n):
        skips.append(_block(sd, f"{prefix}.encoder.down_blocks.{i}", skips[-1], "down"))
    out = skips.pop()
    for i in range(n):
        out = torch.cat([_block(sd, f"{prefix}.decoder.up_blocks.{i}", out, "up"), skips.pop()], 1)
    return out


def _antialias(sd, name, x, stride):
    w = sd[name]
    p = w.shape[-1] // 2
    return F.conv2d(F.pad(x, (p, p, p, p)), w, groups=x.shape[1])[:, :, ::stride, ::stride]


def _grid(h, w, like):
    xs = 2 * (torch.arange(w, dtype=like.dtype) / (w - 1)) - 1
    ys = 2 * (torch.arange(h, dtype=like.dtype) / (h - 1)) - 1
    return torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)], -1)


def keypoints(sd, image, temperature=0.1):
    x = _antialias(sd, "down.weight", image, 4)
    feat = _hourglass(sd, "predictor", x, 5)
    logits = _conv(sd, "kp", feat)
    B, K, h, w = logits.shape
    heat = F.softmax(logits.view(B, K, -1) / temperature, 2).view(B, K, h, w)
    value = (heat[..., None] * _grid(h, w, heat)).sum((2, 3))
    jac = (heat[:, :, None] * _conv(sd, "jacobian", feat).view(B, K, 4, h, w)).sum((3, 4)).view(B, K, 2, 2)
    return {"value": value, "jacobian": jac}


def _dense_motion(sd, source, kp_d, kp_s, variance=0.01):
    src = _antialias(sd, "dense_motion_network.down.weight", source, 4)
    B, C, h, w = src.shape
    K = kp_s["value"].shape[1]
    grid = _grid(h, w, src)

    def gauss(kp):
        return torch.exp(-0.5 * ((grid[None, None] - kp[:, :, None, None]) ** 2).sum(-1) / variance)

    heat = torch.cat([torch.zeros(B, 1, h, w, dtype=src.dtype), gauss(kp_d["value"]) - gauss(kp_s["value"])], 1)
    jac = kp_s["jacobian"] @ torch.linalg.inv(kp_d["jacobian"])
    rel = grid[None, None] - kp_d["value"][:, :, None, None]
    motion = torch.einsum("bkij,bkhwj->bkhwi", jac, rel) + kp_s["value"][:, :, None, None]
    motions = torch.cat([grid[None, None].expand(B, 1, h, w, 2), motion], 1)
    warped = F.grid_sample(
        src.repeat_interleave(K + 1, 0), motions.reshape(B * (K + 1), h, w, 2), align_corners=False
    ).view(B, K + 1, C, h, w)
    feat = _hourglass(
        sd, "dense_motion_network.hourglass", torch.cat([heat[:, :, None], warped], 2).view(B, -1, h, w), 5
    )
    mask = F.softmax(_conv(sd, "dense_motion_network.mask", feat, 3), 1)
    deformation = (motions * mask[..., None]).sum(1)
    occlusion = torch.sigmoid(_conv(sd, "dense_motion_network.occlusion", feat, 3))
    return deformation, occlusion, mask, warped


def _warp(x, deformation):
    if deformation.shape[1:3] != x.shape[2:]:
        deformation = F.interpolate(
            deformation.permute(0, 3, 1, 2), size=x.shape[2:], mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1)
    return F.grid_sample(x, deformation, align_corners=False)


def _render(sd, feat, floors=8):
    p = "Render_model."
    B, _, h, w = feat.shape

    def lin(name, x):
        return F.linear(x, sd[f"{p}nerf_module.{name}.weight"], sd[f"{p}nerf_module.{name}.bias"])

    rgb = _conv(sd, f"{p}rgb_predict.down_conv", feat, 1).view(B, -1, floors, h, w).permute(0, 3, 4, 2, 1)
    vol = _conv(sd, f"{p}sigma_predict.down_conv", feat, 1).view(B, -1, floors, h, w)
    for i in (0, 2, 4):
        r = f"{p}sigma_predict.res_conv3d.{i}"
        y = F.conv3d(F.relu(_bn(sd, f"{r}.norm1", vol)), sd[f"{r}.conv1.weight"], sd[f"{r}.conv1.bias"], padding=1)
        vol = vol + F.conv3d(
            F.relu(_bn(sd, f"{r}.norm2", y)), sd[f"{r}.conv2.weight"], sd[f"{r}.conv2.bias"], padding=1
        )
        vol = _bn(sd, f"{p}sigma_predict.res_conv3d.{i + 1}", vol)
    shape = vol.permute(0, 3, 4, 2, 1)
    s = F.relu(lin("layer2", F.relu(lin("layer1", shape))))
    sigma = F.relu(lin("layer3_1", s))
    x = torch.cat([F.relu(lin("layer3_2", s)), F.relu(lin("layer3_3", rgb))], -1)
    color = lin("layer6", F.relu(lin("layer5", F.relu(lin("layer4", x)))))
    # inclusive transmittance, as the published loop computes it
    weights = torch.exp(-torch.cumsum(sigma, 3)) * (1 - torch.exp(-sigma))
    render = torch.sigmoid((weights * color).sum(3).permute(0, 3, 1, 2))
    mini = _block(sd, f"{p}mini_decoder.0", render, "up")
    mini = torch.sigmoid(_block(sd, f"{p}mini_decoder.2", mini, "up"))
    return render, mini


def _spade(sd, name, x, seg):
    seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
    act = F.relu(_conv(sd, f"{name}.mlp_shared.0", seg, 1))
    return F.instance_norm(x, eps=1e-5) * (1 + _conv(sd, f"{name}.mlp_gamma", act, 1)) + _conv(
        sd, f"{name}.mlp_beta", act, 1
    )


def _decoder(sd, x):
    seg = F.relu(_conv(sd, "decoder.seg_conv.0", x, 1))
    for i in range(4):
        b = f"decoder.SPADE_{i}"
        x = _conv(sd, f"{b}.conv_0", F.relu(_spade(sd, f"{b}.SPADE_0", x, seg)), 1)
        x = _conv(sd, f"{b}.conv_1", F.relu(_spade(sd, f"{b}.SPADE_1", x, seg)), 1)
        if i < 2:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
    return torch.sigmoid(_conv(sd, "decoder.final.0", x, 3))


def generator(sd, source, kp_driving, kp_source):
    x = _block(sd, "first", source, "same")
    x = _block(sd, "down_blocks.1", _block(sd, "down_blocks.0", x, "down"), "down")
    deformation, occlusion, mask, warped = _dense_motion(sd, source, kp_driving, kp_source)
    x = _warp(x, deformation) * occlusion
    render, mini = _render(sd, x)
    return {
        "prediction": _decoder(sd, torch.cat([x, render], 1)),
        "render": render,
        "mini_render": mini,
        "deformation": deformation,
        "occlusion_map": occlusion,
        "mask": mask,
        "sparse_deformed": warped,
        "deformed": _warp(source, deformation),
    }
