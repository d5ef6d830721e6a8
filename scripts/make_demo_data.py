"""Generate sftlab's quickstart dataset: person-description -> JSON extraction.

Writes, under examples/data/:
  person_json_train.json  1200 Alpaca samples ({"instruction", "input", "output"})
  person_json_test.json    200 Alpaca samples
  dataset_info.json       LLaMA-Factory registry for both ("person_json", "person_json_test")

Each input is a short English (60%) or Chinese (40%) sentence giving a person's
name, age and city, sometimes with a distracting job/hobby fact; the output is
the compact one-line JSON {"name": str, "age": int, "city": str}. The task is
small enough for a 135M model to learn on CPU in a few hundred LoRA steps, and
it can be scored automatically (sftlab eval with eval_scorers json_valid, json_fields).

Generation is stdlib-only and seeded: rerunning rewrites the files byte-identically.
Test names are drawn from given-name pools disjoint from train, so no test input
can reappear in train.
"""

import json
import random
from pathlib import Path

SEED = 20240601
N_TRAIN, N_TEST = 1200, 200
EN_SHARE = 0.6
EXTRA_PROB = 0.5  # share of samples carrying a distractor fact
AGES = range(18, 80)
OUT_DIR = Path(__file__).resolve().parent.parent / "examples" / "data"

# --- English pools -----------------------------------------------------------
EN_FIRST = """Maria James Olivia Liam Sofia Noah Emma Lucas Ava Ethan Mia Daniel
Chloe Samuel Grace Omar Hannah Mateo Leah Victor Nora Hugo Isla Felix Zoe Adam
Clara Leo Ruby Oscar Alice Julian Laura Marco Elena Diego Sara Tom Anna Ivan
Nadia Peter Lucy Andre Fatima Ben Ingrid Carlos Yuki Erik Amara Paul Helen
Rafael Priya Kevin Irene Tariq Rosa Simon""".split()
EN_LAST = """Lopez Smith Johnson Brown Garcia Miller Davis Wilson Moore Taylor
Anderson Thomas Martin Clark Lewis Walker Young King Wright Hill Green Baker
Adams Nelson Carter Mitchell Roberts Turner Phillips Campbell Parker Evans
Edwards Collins Stewart Morris Rogers Reed Cook Morgan Bell Murphy Bailey
Rivera Cooper Richardson Cox Howard Ward Torres Peterson Gray Ramirez Watson
Brooks Kelly Sanders Price Bennett Wood""".split()
EN_CITIES = [
    "Porto", "Lisbon", "Madrid", "Barcelona", "Paris", "Lyon", "Berlin", "Munich",
    "Hamburg", "Vienna", "Zurich", "Geneva", "Rome", "Milan", "Naples", "Athens",
    "Prague", "Warsaw", "Budapest", "Dublin", "London", "Manchester", "Edinburgh",
    "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Brussels",
    "Toronto", "Montreal", "Vancouver", "Chicago", "Boston", "Seattle", "Denver",
    "Austin", "New York", "San Diego", "Los Angeles", "Miami", "Mexico City",
    "Lima", "Bogota", "Santiago", "Buenos Aires", "Cape Town", "Nairobi", "Cairo",
    "Istanbul", "Dubai", "Mumbai", "Singapore", "Tokyo", "Seoul", "Sydney",
    "Melbourne", "Auckland",
]
EN_JOBS = ["nurse", "teacher", "software engineer", "chef", "pilot", "lawyer",
           "dentist", "architect", "farmer", "librarian", "mechanic", "journalist"]
EN_HOBBIES = ["painting", "hiking", "chess", "gardening", "cycling", "baking",
              "photography", "swimming", "playing the violin", "bird watching"]
EN_TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, {age}, lives in {city}.",
    "{name} lives in {city} and is {age} years old.",
    "At {age}, {name} still lives in {city}.",
    "{age}-year-old {name} lives in {city}.",
    "Meet {name}: {age} years old, based in {city}.",
    "{name} moved to {city} a while ago and just turned {age}.",
    "My neighbour {name} is {age} and lives in {city}.",
    "In {city}, {name} celebrated turning {age} last week.",
    "{name} is a {age}-year-old resident of {city}.",
    "Living in {city}, {name} is now {age} years old.",
    "{name} has made {city} home and is {age} years old.",
    "This is {name}, who is {age} and calls {city} home.",
    "Name: {name}. Age: {age}. Lives in {city}.",
]
EN_EXTRAS = ["{first} works as a {job}.", "{first} is a {job}.",
             "{first} enjoys {hobby}.", "In their free time, {first} loves {hobby}."]
EN_INSTRUCTIONS = [
    'Extract the person\'s name, age and city from the text. Reply with a single-line JSON object with the keys "name", "age" and "city".',
    'Read the sentence and return JSON with the keys "name", "age" and "city" (age as an integer).',
    'Convert the description into a JSON object of the form {"name": ..., "age": ..., "city": ...}.',
    'Who is described below? Output only a JSON object with the fields "name", "age" and "city".',
    "Pull out the name, age and city of the person mentioned. Respond with compact JSON only, keys in the order name, age, city.",
]

# --- Chinese pools -----------------------------------------------------------
ZH_SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程")
ZH_GIVEN = """伟 芳 娜 敏 静 丽 强 磊 军 洋 勇 艳 杰 娟 涛 明 超 秀英 霞 平 刚 桂英
建华 晓东 子涵 浩然 雨桐 思远 欣怡 宇轩 梓萱 俊杰 嘉怡 文博 佳琪 志强 海燕 晨曦
一鸣 若曦 天宇 诗涵 博文 雅婷 凯 琳 鹏 颖 浩 婷 宏 慧 建国 美玲 国强 丹 波 红梅""".split()
ZH_CITIES = [
    "北京", "上海", "广州", "深圳", "成都", "重庆", "杭州", "南京", "武汉", "西安",
    "天津", "苏州", "长沙", "郑州", "青岛", "沈阳", "大连", "厦门", "福州", "济南",
    "合肥", "昆明", "南宁", "贵阳", "兰州", "太原", "石家庄", "哈尔滨", "长春", "南昌",
    "宁波", "无锡", "佛山", "东莞", "珠海", "温州", "烟台", "洛阳", "桂林", "拉萨",
    "乌鲁木齐", "呼和浩特", "银川", "西宁", "海口", "三亚", "扬州", "绍兴", "徐州", "泉州",
    "汕头", "唐山", "潍坊", "大理", "丽江",
]
ZH_JOBS = ["医生", "老师", "程序员", "厨师", "律师", "护士", "工程师", "记者", "设计师", "司机"]
ZH_HOBBIES = ["爬山", "下棋", "弹钢琴", "摄影", "跑步", "书法", "钓鱼", "养花", "看电影", "做饭"]
ZH_TEMPLATES = [
    "{name}今年{age}岁，住在{city}。",
    "{name}，{age}岁，现居{city}。",
    "我的朋友{name}住在{city}，今年{age}岁。",
    "住在{city}的{name}已经{age}岁了。",
    "今年{age}岁的{name}在{city}生活。",
    "{name}目前在{city}居住，年龄{age}岁。",
    "在{city}，{age}岁的{name}过着平静的生活。",
    "{name}（{age}岁）家住{city}。",
    "{name}是{city}人，今年{age}岁。",
    "这位名叫{name}的居民今年{age}岁，住在{city}。",
    "{name}几年前搬到了{city}，上个月刚满{age}岁。",
    "姓名：{name}；年龄：{age}岁；城市：{city}。",
]
# Appended as a subject-less clause before the final "。", the natural Chinese pattern.
ZH_EXTRAS = ["是一名{job}", "平时喜欢{hobby}", "职业是{job}", "业余爱好是{hobby}"]
ZH_INSTRUCTIONS = [
    '从下面的句子中提取人物的姓名、年龄和城市，以JSON格式输出，键为"name"、"age"、"city"。',
    '请阅读文本，只输出一个JSON对象，包含"name"、"age"、"city"三个字段（age为整数）。',
    '将以下描述转换为JSON：{"name": ..., "age": ..., "city": ...}。',
    "提取文中人物的名字、年龄和所在城市，只回答单行JSON。",
    "根据句子内容，用JSON给出这个人的name、age和city。",
]


def _split(pool):
    """Every 5th entry goes to test, the rest to train (disjoint, deterministic)."""
    return ([x for i, x in enumerate(pool) if i % 5], pool[::5])


def _en_sample(rng, firsts):
    first, last = rng.choice(firsts), rng.choice(EN_LAST)
    name, age, city = f"{first} {last}", rng.choice(AGES), rng.choice(EN_CITIES)
    text = rng.choice(EN_TEMPLATES).format(name=name, age=age, city=city)
    if rng.random() < EXTRA_PROB:
        extra = rng.choice(EN_EXTRAS).format(
            first=first, job=rng.choice(EN_JOBS), hobby=rng.choice(EN_HOBBIES))
        # Put the distractor before or after, so facts appear in varied orders.
        text = f"{extra} {text}" if rng.random() < 0.3 else f"{text} {extra}"
    return rng.choice(EN_INSTRUCTIONS), text, name, age, city


def _zh_sample(rng, givens):
    name = rng.choice(ZH_SURNAMES) + rng.choice(givens)
    age, city = rng.choice(AGES), rng.choice(ZH_CITIES)
    text = rng.choice(ZH_TEMPLATES).format(name=name, age=age, city=city)
    if rng.random() < EXTRA_PROB:
        extra = rng.choice(ZH_EXTRAS).format(job=rng.choice(ZH_JOBS), hobby=rng.choice(ZH_HOBBIES))
        text = text[:-1] + "，" + extra + "。"
    return rng.choice(ZH_INSTRUCTIONS), text, name, age, city


def make_split(rng, n, en_firsts, zh_givens):
    """Return n Alpaca samples (exactly round(n*EN_SHARE) English), unique inputs, shuffled."""
    n_en = round(n * EN_SHARE)
    samples, seen = [], set()
    for make, pool, count in ((_en_sample, en_firsts, n_en), (_zh_sample, zh_givens, n - n_en)):
        made = 0
        while made < count:
            instruction, text, name, age, city = make(rng, pool)
            if text in seen:
                continue
            seen.add(text)
            output = json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)
            samples.append({"instruction": instruction, "input": text, "output": output})
            made += 1
    rng.shuffle(samples)
    return samples


def _write(path, obj):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def main():
    rng = random.Random(SEED)
    en_train, en_test = _split(EN_FIRST)
    zh_train, zh_test = _split(ZH_GIVEN)
    train = make_split(rng, N_TRAIN, en_train, zh_train)
    test = make_split(rng, N_TEST, en_test, zh_test)
    assert not {s["input"] for s in train} & {s["input"] for s in test}

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    _write(OUT_DIR / "person_json_train.json", train)
    _write(OUT_DIR / "person_json_test.json", test)
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    _write(OUT_DIR / "dataset_info.json", {
        name: {"file_name": file, "formatting": "alpaca", "columns": columns}
        for name, file in (("person_json", "person_json_train.json"),
                           ("person_json_test", "person_json_test.json"))
    })
    print(f"wrote {len(train)} train / {len(test)} test samples to {OUT_DIR}")


if __name__ == "__main__":
    main()
