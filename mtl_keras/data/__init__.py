"""Datasets for many-task learning, as `tf.data` pipelines plus `TaskSet`s."""

from mtl_keras.data.omniglot import ALPHABET_NUM_CHARACTERS
from mtl_keras.data.omniglot import ALPHABETS
from mtl_keras.data.omniglot import ALPHABETS_BACKGROUND
from mtl_keras.data.omniglot import ALPHABETS_EVALUATION
from mtl_keras.data.omniglot import ARCHIVE_SETS
from mtl_keras.data.omniglot import NO_DOWNLOAD_ENV
from mtl_keras.data.omniglot import OFFICIAL_ARCHIVES
from mtl_keras.data.omniglot import OMNIGLOT_CHECKSUMS_ENV
from mtl_keras.data.omniglot import OMNIGLOT_DIR_ENV
from mtl_keras.data.omniglot import OMNIGLOT_URL
from mtl_keras.data.omniglot import OMNIGLOT_URL_ENV
from mtl_keras.data.omniglot import SPLIT_DRAWERS
from mtl_keras.data.omniglot import OmniglotAlphabets
from mtl_keras.data.omniglot import OmniglotAlphabetsConfig
from mtl_keras.data.omniglot import OmniglotArchiveError
from mtl_keras.data.omniglot import OmniglotData
from mtl_keras.data.omniglot import OmniglotDownloadError
from mtl_keras.data.omniglot import OmniglotNotFoundError
from mtl_keras.data.omniglot import find_omniglot_dir
from mtl_keras.data.omniglot import load_omniglot
from mtl_keras.data.omniglot import omniglot_builder
from mtl_keras.data.omniglot import omniglot_tasks
