"""Command-line flags that locate and load Omniglot, shared by every app that trains on it."""

from mtl_keras.data.omniglot import ARCHIVE_SETS, NO_DOWNLOAD_ENV, OMNIGLOT_DIR_ENV, load_omniglot


def add_omniglot_arguments(parser):
    """Adds `--data-dir`, `--archives`, `--tfds-dir` and `--no-download` to `parser`.

    Returns:
        The parser.

    Example:

    >>> parser = argparse.ArgumentParser()
    >>> add_omniglot_arguments(parser)
    >>> data = load_omniglot_from_args(parser.parse_args([]), get_preset("default"))
    """
    group = parser.add_argument_group("data files")
    group.add_argument("--data-dir", default=None,
                       help=f"folder with images_background.zip / images_evaluation.zip (or set "
                            f"{OMNIGLOT_DIR_ENV}); default: TFDS's manual dir, then ../shared/data/omniglot "
                            "beside the checkout, else a download")
    group.add_argument("--archives", choices=tuple(ARCHIVE_SETS), default="full",
                       help="'full' = 50 alphabets; 'small' = the 8 alphabets of the _small zips (quick runs)")
    group.add_argument("--tfds-dir", default=None,
                       help="where the prepared TFDS dataset is cached (default ~/tensorflow_datasets)")
    group.add_argument("--no-download", action="store_true",
                       help=f"never download the archives when none are found (or set {NO_DOWNLOAD_ENV}=1)")
    return parser


def load_omniglot_from_args(args, config, seed=None):
    """`load_omniglot` with the data-file flags of `args` and the task/size/batch of a `TrainConfig`.

    Args:
        args: parsed flags from a parser given `add_omniglot_arguments`.
        config: the `mtl_keras.presets.TrainConfig` (tasks, image_size,
            batch_size, seed, training augmentation).
        seed: the shuffle seed, overriding `config.seed`.

    Returns:
        An `OmniglotData`.
    """
    return load_omniglot(
        data_dir=args.data_dir, tasks=config.tasks, image_size=config.image_size, batch_size=config.batch_size,
        tfds_dir=args.tfds_dir, archives=args.archives, seed=config.seed if seed is None else seed,
        download=not args.no_download, augment=config.augmentation(),
    )
