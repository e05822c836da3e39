"""U-REPA for SD 1.5 (seed 003): preprocessing to LMDB, the DINOv2 teacher, alignment training."""
