"""The toy world: a synthetic world small enough to run the whole method on one CPU, with a judge
whose answers are known to be right (docs/toy-and-rounds.md).

It is a plug-in: no module outside this package imports it. It is registered by name where a
config value picks it: `model.kind = "toy"` (gigavideo.models.pipeline.BASE_MODELS), `score.judge = "toy"`
(gigavideo.judges.judge.JUDGES), `real_captions = "procedural:N"` (stage 1's REAL_CAPTION_SOURCES) and the
`[toy]` config section (gigavideo.config.PLUGIN_SECTIONS).

    clips.py        the world's clips and their captions
    real_videos.py  those clips as stage 1's real videos
    vae.py          the pixel-space VAE (a stock AutoencoderKLWan with hand-set weights)
    pretrain.py     the base model's pre-training: the base step of model.kind = "toy"
    judge.py        the judge that answers from the pixels
    config.py       the [toy] section
"""
