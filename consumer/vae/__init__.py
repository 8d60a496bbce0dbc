"""The VAE decoder fine-tune (Qwen-Image report, 2.3): the encoder frozen, so every cached latent
stays valid; the decoder trained on text-rich images for sharper text and small objects.

    model.py        the VAE: frozen encoder half, the trainable decoder path (optional recompute)
    data.py         image pools from webdataset shards (bad inputs counted), seeded crops, the mix
    perceptual.py   LPIPS with reference parameter names (real weights from a local directory)
    losses.py       L1/L2 reconstruction + scheduled perceptual weight
    trainer.py      the DDP loop: steps, metrics, evaluation, checkpoints, export
    checkpoint.py   the checkpoint format (run-dir conventions of consumer/checkpoint.py)
    evaluation.py   PSNR, SSIM, OCR word accuracy on held-out crops; before/after pairs
    export.py       back to the diffusers layout, encoder bit-identical, lineage for the cache

`mmdit vae-train` (launch/vae_train.py) runs it; settings are config/vae.py's `vae` section.
"""
