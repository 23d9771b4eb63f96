"""The recipes beyond the poster that make a tap find objects: the extra
objectives (`objectives`), the augmented views they compare (`views`), and the
pseudo-instance masks a segmenter draws for them (`pseudo_masks`)."""
