"""Every benchmark data set on a tiny tree written in its official layout; exact label mappings."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from dataloader.ade20k import ADE20K
from dataloader.camvid import CamVid
from dataloader.cityscapes import TRAIN_TO_LABEL_ID, Cityscapes
from dataloader.coco_stuff import COCOStuff10k, COCOStuff164k
from dataloader.folder import Folder
from dataloader.kitti_road import KITTIRoad
from dataloader.minicity import MiniCity
from dataloader.pascal_context import PascalContext, PascalContext60
from dataloader.voc import PascalVOC
from utils.errors import ConfigError, DataError
from utils.registry import DATASETS

IGNORE = 255


def write_image(path: Path, height: int, width: int, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), value, np.uint8))


def write_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), label)


def label_of(dataset, index: int = 0) -> np.ndarray:
    image, label = dataset[index][:2]
    assert image.dtype.is_floating_point is False and image.shape[:2] == label.shape
    return label.numpy()


@pytest.mark.parametrize("cls", [PascalVOC, Cityscapes, MiniCity, ADE20K, COCOStuff164k, COCOStuff10k,
                                 PascalContext, PascalContext60, KITTIRoad, CamVid])
def test_class_attributes_agree(cls):
    assert DATASETS.get(cls.__name__) is cls
    assert len(cls.palette) == cls.num_classes() == len(set(cls.class_names))
    assert len(set(cls.palette)) == len(cls.palette)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in cls.palette)
    info = cls.info({})
    assert info.num_classes == cls.num_classes() and info.palette == tuple(cls.palette)


@pytest.mark.parametrize("cls, count", [(PascalVOC, 21), (Cityscapes, 19), (MiniCity, 19), (ADE20K, 150),
                                        (COCOStuff164k, 171), (COCOStuff10k, 171), (PascalContext, 59),
                                        (PascalContext60, 60), (KITTIRoad, 2)])
def test_number_of_classes(cls, count):
    assert cls.num_classes() == count


# --- Pascal VOC ---------------------------------------------------------------------------

def write_voc_palette_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label, mode="P")
    image.putpalette([v for c in PascalVOC.palette for v in c] + [224, 224, 192] * 235)
    image.save(path)


@pytest.fixture
def voc_tree(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    label = np.array([[0, 15, 255], [20, 1, 0]], np.uint8)  # background, person, border, tv, aeroplane
    for name in ("2007_000032", "2007_000039"):
        write_image(root / "JPEGImages" / f"{name}.jpg", 2, 3)
        write_voc_palette_png(root / "SegmentationClass" / f"{name}.png", label)
    write_image(root / "JPEGImages" / "2008_000001.jpg", 2, 3)
    write_label(root / "SegmentationClassAug" / "2008_000001.png", np.array([[3, 3, 255], [0, 0, 7]], np.uint8))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000032\n")
    (sets / "val.txt").write_text("2007_000039\n")
    (sets / "trainval.txt").write_text("2007_000032\n2007_000039\n")
    (sets / "train_aug.txt").write_text("2008_000001\n")
    return root


def test_voc_reads_palette_indices_and_ignores_the_border(voc_tree):
    dataset = PascalVOC(str(voc_tree), "train")
    assert Image.open(dataset.samples[0][1]).mode == "P"  # the colours are not what is read
    assert label_of(dataset).tolist() == [[0, 15, IGNORE], [20, 1, 0]]
    assert len(PascalVOC(str(voc_tree), "trainval")) == 2


def test_voc_border_follows_another_ignore_index(voc_tree):
    assert label_of(PascalVOC(str(voc_tree), "val", ignore_index=-1)).tolist() == [[0, 15, -1], [20, 1, 0]]


def test_voc_train_aug_reads_segmentation_class_aug(voc_tree):
    dataset = PascalVOC(str(voc_tree), "train_aug")
    assert dataset.samples[0][1].parent.name == "SegmentationClassAug"
    assert label_of(dataset).tolist() == [[3, 3, IGNORE], [0, 0, 7]]


def test_voc_listed_image_missing_is_named(voc_tree):
    (voc_tree / "ImageSets" / "Segmentation" / "val.txt").write_text("2099_000000\n")
    with pytest.raises(DataError, match="2099_000000.jpg"):
        PascalVOC(str(voc_tree), "val")


def test_voc_missing_split_list_names_it_and_the_layout(voc_tree):
    (voc_tree / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    with pytest.raises(DataError, match="train_aug.txt not found; expected VOCdevkit/VOC2012"):
        PascalVOC(str(voc_tree), "train_aug")


# --- Cityscapes and MiniCity ------------------------------------------------------------------

CITY_LABEL_IDS = np.array([[7, 8, 26, 33], [0, 4, 29, 24]], np.uint8)  # road sidewalk car bicycle / void...
CITY_TRAIN_IDS = [[0, 1, 13, 18], [IGNORE, IGNORE, IGNORE, 11]]  # caravan (29) is not a train class


def write_city(root: Path, split: str, stem: str, gt: str = "gtFine", city: str | None = "aachen") -> None:
    sub = Path(city) if city else Path()
    write_image(root / "leftImg8bit" / split / sub / f"{stem}_leftImg8bit.png", 2, 4)
    write_label(root / gt / split / sub / f"{stem}_{gt}_labelIds.png", CITY_LABEL_IDS)
    instances = CITY_LABEL_IDS.astype(np.uint16)
    instances[0, 2], instances[1, 3] = 26001, 24000
    write_label(root / gt / split / sub / f"{stem}_{gt}_instanceIds.png", instances)


@pytest.fixture
def city_tree(tmp_path) -> Path:
    root = tmp_path / "cityscapes"
    write_city(root, "train", "aachen_000000_000019")
    write_city(root, "train", "bochum_000000_000313", city="bochum")
    write_city(root, "val", "frankfurt_000000_000294", city="frankfurt")
    write_city(root, "train_extra", "erlangen_000000_000001", gt="gtCoarse", city="erlangen")
    write_city(root, "train", "aachen_000000_000019", gt="gtCoarse")
    write_city(root, "train", "bochum_000000_000313", gt="gtCoarse", city="bochum")
    return root


def test_cityscapes_maps_label_ids_to_train_ids(city_tree):
    dataset = Cityscapes(str(city_tree), "train")
    assert [p[0].parent.name for p in dataset.samples] == ["aachen", "bochum"]
    assert label_of(dataset).tolist() == CITY_TRAIN_IDS


def test_cityscapes_table_matches_cityscapesscripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    lut = Cityscapes.label_lut(IGNORE)
    for label in labels.labels:
        if label.id >= 0:
            assert lut[label.id] == (IGNORE if label.trainId in (255, -1) else label.trainId), label.name
    assert Cityscapes.class_names == tuple(labels.trainId2label[i].name for i in range(19))
    assert Cityscapes.palette == tuple(tuple(labels.trainId2label[i].color) for i in range(19))


def test_cityscapes_predictions_back_to_label_ids():
    train_ids = np.arange(19).reshape(1, 19)
    assert Cityscapes.to_label_ids(train_ids).tolist() == [list(TRAIN_TO_LABEL_ID)]
    mapped = Cityscapes.label_lut(IGNORE)[Cityscapes.to_label_ids(train_ids)]
    assert mapped.tolist() == train_ids.tolist()
    with pytest.raises(ValueError, match="0-18"):
        Cityscapes.to_label_ids(np.array([[19]]))


def test_cityscapes_coarse_and_train_extra(city_tree):
    coarse = Cityscapes(str(city_tree), "train", mode="coarse")
    assert coarse.samples[0][1].name == "aachen_000000_000019_gtCoarse_labelIds.png"
    extra = Cityscapes(str(city_tree), "train_extra", mode="coarse")
    assert extra.samples[0][1].name == "erlangen_000000_000001_gtCoarse_labelIds.png"
    with pytest.raises(ValueError, match="coarse"):
        Cityscapes(str(city_tree), "train_extra")
    assert len(Cityscapes(str(city_tree), "trainval")) == 3


def test_cityscapes_instance_maps_are_the_third_item(city_tree):
    image, label, instances = Cityscapes(str(city_tree), "val", instance_maps=True)[0]
    assert instances.dtype.itemsize == 4 and instances[0, 2] == 26001 and instances[1, 3] == 24000
    assert instances[0, 0] == 7 and label.tolist() == CITY_TRAIN_IDS


def test_cityscapes_image_without_label_is_named(city_tree):
    write_image(city_tree / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000001_000000_leftImg8bit.png", 2, 4)
    with pytest.raises(DataError, match="frankfurt_000001_000000_gtFine_labelIds.png"):
        Cityscapes(str(city_tree), "val")


def test_minicity_has_no_city_folders(tmp_path):
    root = tmp_path / "minicity"
    write_city(root, "train", "aachen_000000_000019", city=None)
    write_city(root, "val", "zurich_000001_000019", city=None)
    dataset = MiniCity(str(root), "train")
    assert label_of(dataset).tolist() == CITY_TRAIN_IDS
    assert len(MiniCity(str(root), "trainval")) == 2
    assert MiniCity.class_names == Cityscapes.class_names


# --- ADE20K ---------------------------------------------------------------------------------

def test_ade20k_zero_is_ignored_and_classes_shift_down(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_image(root / "images" / "validation" / "ADE_val_00000001.jpg", 1, 4)
    write_label(root / "annotations" / "validation" / "ADE_val_00000001.png", np.array([[0, 1, 150, 13]], np.uint8))
    dataset = ADE20K(str(root), "val")
    assert label_of(dataset).tolist() == [[IGNORE, 0, 149, 12]]
    assert ADE20K.class_names[12] == "person"
    with pytest.raises(DataError, match="images/training not found"):
        ADE20K(str(root), "train")


def test_ade20k_value_above_150_names_the_file(tmp_path):
    root = tmp_path / "ade"
    write_image(root / "images" / "training" / "ADE_train_00000001.jpg", 1, 2)
    write_label(root / "annotations" / "training" / "ADE_train_00000001.png", np.array([[151, 1]], np.uint8))
    with pytest.raises(DataError, match=r"ADE_train_00000001.png: label value 151"):
        ADE20K(str(root), "train")[0]


# --- COCO-Stuff ------------------------------------------------------------------------------

def test_coco_stuff_164k_maps_182_ids_to_171_classes(tmp_path):
    root = tmp_path / "coco_stuff164k"
    # PNG values are label id - 1: person(0), bicycle(1), toothbrush id 90 (89), banner id 92 (91),
    # wood id 182 (181), unlabeled 255.
    write_image(root / "images" / "train2017" / "000000000009.jpg", 1, 6)
    write_label(root / "annotations" / "train2017" / "000000000009.png",
                np.array([[0, 1, 89, 91, 181, 255]], np.uint8))
    dataset = COCOStuff164k(str(root), "train")
    assert label_of(dataset).tolist() == [[0, 1, 79, 80, 170, IGNORE]]
    assert COCOStuff164k.class_names[79] == "toothbrush" and COCOStuff164k.class_names[80] == "banner"


def test_coco_stuff_164k_unused_id_is_an_error(tmp_path):
    root = tmp_path / "coco"
    write_image(root / "images" / "val2017" / "1.jpg", 1, 2)
    write_label(root / "annotations" / "val2017" / "1.png", np.array([[11, 0]], np.uint8))  # id 12: unused
    with pytest.raises(DataError, match="label value 11"):
        COCOStuff164k(str(root), "val")[0]


def test_coco_stuff_10k_reads_mat_files_and_image_lists(tmp_path):
    root = tmp_path / "cocostuff-10k"
    (root / "annotations").mkdir(parents=True)
    (root / "imageLists").mkdir()
    for name in ("COCO_train2014_000000000077", "COCO_train2014_000000000078"):
        write_image(root / "images" / f"{name}.jpg", 1, 5)
        scipy.io.savemat(root / "annotations" / f"{name}.mat",
                         {"S": np.array([[0, 1, 90, 92, 182]], np.uint16), "names": np.array(["x"])})
    (root / "imageLists" / "train.txt").write_text("COCO_train2014_000000000077\n")
    (root / "imageLists" / "test.txt").write_text("COCO_train2014_000000000078\n")
    dataset = COCOStuff10k(str(root), "train")
    assert len(dataset) == 1
    assert label_of(dataset).tolist() == [[IGNORE, 0, 79, 80, 170]]
    assert len(COCOStuff10k(str(root), "test")) == 1


def test_coco_stuff_10k_mat_without_s_is_named(tmp_path):
    root = tmp_path / "c10k"
    (root / "annotations").mkdir(parents=True)
    (root / "imageLists").mkdir()
    write_image(root / "images" / "a.jpg", 1, 2)
    scipy.io.savemat(root / "annotations" / "a.mat", {"L": np.zeros((1, 2))})
    (root / "imageLists" / "train.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"a.mat: expected a 2-D label matrix under the key 'S'"):
        COCOStuff10k(str(root), "train")[0]


# --- Pascal Context --------------------------------------------------------------------------

@pytest.fixture
def context_tree(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2010"
    write_image(root / "JPEGImages" / "2008_000002.jpg", 1, 4)
    write_label(root / "SegmentationClassContext" / "2008_000002.png", np.array([[0, 1, 59, 37]], np.uint8))
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "train.txt").write_text("2008_000002\n")
    return root


def test_pascal_context_59_ignores_background_and_shifts(context_tree):
    assert label_of(PascalContext(str(context_tree), "train")).tolist() == [[IGNORE, 0, 58, 36]]
    assert PascalContext.class_names[36] == "person"


def test_pascal_context_60_keeps_background(context_tree):
    assert label_of(PascalContext60(str(context_tree), "train")).tolist() == [[0, 1, 59, 37]]
    assert PascalContext60.class_names[37] == "person" and PascalContext60.class_names[0] == "background"


# --- KITTI road ------------------------------------------------------------------------------

def write_kitti(root: Path, category: str, number: str, colors: list) -> None:
    write_image(root / "training" / "image_2" / f"{category}_{number}.png", 1, len(colors))
    gt = np.array([colors], np.uint8)[..., ::-1]  # RGB -> BGR for OpenCV
    write_label(root / "training" / "gt_image_2" / f"{category}_road_{number}.png", np.ascontiguousarray(gt))


@pytest.fixture
def kitti_tree(tmp_path) -> Path:
    root = tmp_path / "data_road"
    for n in range(6):
        write_kitti(root, "um", f"{n:06d}", [(255, 0, 255), (255, 0, 0), (0, 0, 0)])
    write_kitti(root, "uu", "000000", [(255, 0, 0), (255, 0, 255), (255, 0, 255)])
    return root


def test_kitti_road_decodes_colours(kitti_tree):
    dataset = KITTIRoad(str(kitti_tree), "trainval")
    assert len(dataset) == 7
    assert label_of(dataset, 0).tolist() == [[0, 1, IGNORE]]
    assert label_of(dataset, 6).tolist() == [[1, 0, 0]]


def test_kitti_road_val_is_every_nth_image_per_category(kitti_tree):
    val = KITTIRoad(str(kitti_tree), "val", val_every=5)
    assert [p[0].name for p in val.samples] == ["um_000004.png"]
    assert len(KITTIRoad(str(kitti_tree), "train", val_every=5)) == 6


def test_kitti_road_unknown_colour_names_file_and_colour(kitti_tree):
    write_kitti(kitti_tree, "umm", "000000", [(255, 0, 255), (10, 20, 30)])
    dataset = KITTIRoad(str(kitti_tree), "trainval")
    with pytest.raises(DataError, match=r"umm_road_000000.png: colour \(10, 20, 30\) in 1 pixel"):
        dataset[[p[0].name for p in dataset.samples].index("umm_000000.png")]


# --- CamVid test split -----------------------------------------------------------------------

def test_camvid_test_split(tmp_path):
    root = tmp_path / "camvid"
    write_image(root / "test" / "0001TP_008550.png", 1, 3)
    write_label(root / "testannot" / "0001TP_008550.png", np.array([[0, 11, 10]], np.uint8))
    write_image(root / "train" / "a.png", 1, 3)
    write_label(root / "trainannot" / "a.png", np.array([[1, 1, 1]], np.uint8))
    dataset = CamVid(str(root), "test")
    assert len(dataset) == 1 and label_of(dataset).tolist() == [[0, IGNORE, 10]]


# --- your own data ---------------------------------------------------------------------------

def test_folder_index_masks_with_classes_from_config(tmp_path):
    write_image(tmp_path / "images" / "b.jpg", 1, 3)
    write_image(tmp_path / "images" / "a.png", 1, 3)
    write_label(tmp_path / "masks" / "a.png", np.array([[0, 2, 255]], np.uint8))
    write_label(tmp_path / "masks" / "b.png", np.array([[1, 1, 0]], np.uint8))
    dataset = Folder(str(tmp_path), classes=["bg", "crack", "rust"])
    assert [p[0].name for p in dataset.samples] == ["a.png", "b.jpg"]
    assert label_of(dataset, 0).tolist() == [[0, 2, IGNORE]]
    assert dataset.num_classes() == 3 and dataset.class_names == ("bg", "crack", "rust")
    assert len(set(dataset.palette)) == 3


def test_folder_unknown_index_names_file_and_value(tmp_path):
    write_image(tmp_path / "images" / "a.png", 1, 2)
    write_label(tmp_path / "masks" / "a.png", np.array([[0, 3]], np.uint8))
    dataset = Folder(str(tmp_path), classes=["bg", "crack", "rust"])
    with pytest.raises(DataError, match=r"masks/a.png: label value 3 is neither a class \(0-2\)"):
        dataset[0]


def test_folder_colour_masks_through_classes_json_beside_the_data(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps(
        {"classes": ["background", "road"], "colors": [[0, 0, 0], [128, 64, 128]]}))
    split_dir = tmp_path / "train"
    write_image(split_dir / "images" / "x.jpg", 1, 3)
    rgb = np.array([[[0, 0, 0], [128, 64, 128], [255, 255, 255]]], np.uint8)
    write_label(split_dir / "masks" / "x.png", np.ascontiguousarray(rgb[..., ::-1]))
    dataset = Folder(str(split_dir), mask_format="color", void_colors=[[255, 255, 255]])
    assert label_of(dataset).tolist() == [[0, 1, IGNORE]]
    assert Folder.info({"data_dir": str(split_dir)}).class_names == ("background", "road")
    strict = Folder(str(split_dir), mask_format="color")
    with pytest.raises(DataError, match=r"x.png: colour \(255, 255, 255\) in 1 pixel\(s\)"):
        strict[0]


def test_folder_colour_masks_saved_as_palette_pngs(tmp_path):
    write_image(tmp_path / "images" / "x.jpg", 1, 2)
    mask = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    mask.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    (tmp_path / "masks").mkdir()
    mask.save(tmp_path / "masks" / "x.png")
    dataset = Folder(str(tmp_path), classes=["bg", "fire"], colors=[[0, 0, 0], [250, 0, 0]], mask_format="color")
    assert label_of(dataset).tolist() == [[0, 1]]


def test_folder_list_file_selects_stems(tmp_path):
    for stem in ("a", "b", "c"):
        write_image(tmp_path / "images" / f"{stem}.png", 1, 1)
        write_label(tmp_path / "masks" / f"{stem}.png", np.zeros((1, 1), np.uint8))
    (tmp_path / "val.txt").write_text("c\na\n")
    dataset = Folder(str(tmp_path), split="val", classes=["bg"])
    assert [p[0].stem for p in dataset.samples] == ["c", "a"]
    (tmp_path / "val.txt").write_text("d\n")
    with pytest.raises(DataError, match="without an image"):
        Folder(str(tmp_path), split="val", classes=["bg"])


def test_folder_image_without_mask_is_named(tmp_path):
    write_image(tmp_path / "images" / "a.png", 1, 1)
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match=r"1 image\(s\) without a mask .* a.png"):
        Folder(str(tmp_path), classes=["bg"])


@pytest.mark.parametrize("args, fragment", [
    ({}, "no classes given"),
    ({"classes": ["a", "b"], "mask_format": "color"}, "colour masks need 'colors'"),
    ({"classes": ["a", "b"], "colors": [[0, 0, 0]]}, "2 \\[r, g, b\\] lists"),
    ({"classes": ["a", "b"], "colors": [[0, 0, 0], [0, 0, 0]]}, "share a colour"),
    ({"classes": ["a", "b"], "colors": [1, 2]}, "2 \\[r, g, b\\] lists"),
])
def test_folder_bad_classes_are_config_errors(tmp_path, args, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Folder.info({"data_dir": str(tmp_path), **args})


# --- reading single label files without a data set (inference --labels) ---------------------

def test_label_decoders_map_files_like_the_data_sets(tmp_path, kitti_tree):
    path = tmp_path / "city_gtFine_labelIds.png"
    write_label(path, CITY_LABEL_IDS)
    assert Cityscapes.label_decoder({}, IGNORE)(path).tolist() == CITY_TRAIN_IDS
    road = kitti_tree / "training" / "gt_image_2" / "um_road_000000.png"
    assert KITTIRoad.label_decoder({}, IGNORE)(road).tolist() == [[0, 1, IGNORE]]
    mat = tmp_path / "a.mat"
    scipy.io.savemat(mat, {"S": np.array([[0, 1, 182]], np.uint16)})
    assert COCOStuff10k.label_decoder({}, IGNORE)(mat).tolist() == [[IGNORE, 0, 170]]


def test_folder_label_decoder_reads_colours_from_the_args(tmp_path):
    rgb = np.array([[[0, 0, 0], [250, 0, 0], [9, 9, 9]]], np.uint8)
    write_label(tmp_path / "m.png", np.ascontiguousarray(rgb[..., ::-1]))
    args = {"data_dir": str(tmp_path), "classes": ["bg", "fire"], "colors": [[0, 0, 0], [250, 0, 0]],
            "mask_format": "color", "void_colors": [[9, 9, 9]]}
    assert Folder.label_decoder(args, IGNORE)(tmp_path / "m.png").tolist() == [[0, 1, IGNORE]]
    write_label(tmp_path / "i.png", np.array([[1, 0, 255]], np.uint8))
    index_args = {"data_dir": str(tmp_path), "classes": ["bg", "fire"]}
    assert Folder.label_decoder(index_args, IGNORE)(tmp_path / "i.png").tolist() == [[1, 0, IGNORE]]
    with pytest.raises(ConfigError, match=r"void colour \[0, 0, 0\] is also the colour of class 'bg'"):
        Folder.label_decoder({**args, "void_colors": [[0, 0, 0]]}, IGNORE)


@pytest.mark.slow  # imports every component for the config and augments 512x1024 crops
def test_minicity_config_trains_on_the_official_layout(tmp_path):
    from builder import build_loader
    from utils.config import load_config
    root = tmp_path / "minicity"
    for i in range(3):
        write_city(root, "train", f"aachen_00000{i}_000019", city=None)
    write_city(root, "val", "zurich_000001_000019", city=None)
    path = Path(__file__).resolve().parents[1] / "configs" / "minicity_deeplabv3plus.json"
    config = load_config(path, [f"train_loader.args.data_dir={root}", f"val_loader.args.data_dir={root}",
                                "train_loader.args.batch_size=2", "train_loader.args.num_workers=0"])
    loader = build_loader(config, "train_loader")
    loader.set_epoch(1)
    images, labels = next(iter(loader))
    assert images.shape == (2, 512, 1024, 3) and labels.shape == (2, 512, 1024)
    assert set(np.unique(labels.numpy()).tolist()) <= {0, 1, 11, 13, 18, IGNORE}
