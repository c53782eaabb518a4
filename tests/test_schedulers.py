"""hub_spawner/schedulers/__init__.py: the shared XML reader of scheduler output, and what an
error about unreadable output says."""

import time

import pytest

from hub_spawner.schedulers import (
    MAX_OUTPUT_BYTES,
    CommandOutput,
    JobState,
    SubmitRejected,
    parse_xml,
    read_output,
    sge,
    slurm,
)

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<job_info><job_list><JB_job_number>1</JB_job_number><state>&lol9;</state></job_list></job_info>
"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE job_info [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<job_info><job_list><state>&secret;</state></job_list></job_info>
"""
PARAMETER_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE job_info [<!ENTITY % remote SYSTEM "http://127.0.0.1:9/x.dtd"> %remote;]>
<job_info/>
"""
BARE_DOCTYPE = '<?xml version="1.0"?><!DOCTYPE job_info><job_info/>'


@pytest.mark.parametrize("document", [BILLION_LAUGHS, EXTERNAL_ENTITY, PARAMETER_ENTITY,
                                      BARE_DOCTYPE], ids=["laughs", "external", "parameter",
                                                          "doctype"])
def test_a_doctype_is_refused_before_anything_is_expanded(document):
    started = time.monotonic()
    with pytest.raises(ValueError, match="unreadable qstat -xml output: it has a DOCTYPE"):
        parse_xml(document, "qstat -xml")
    assert time.monotonic() - started < 1


def test_an_undeclared_entity_is_a_parse_error():
    with pytest.raises(ValueError, match="unreadable qstat -x output"):
        parse_xml("<Data><Job>&lol9;</Job></Data>", "qstat -x")


def test_output_over_the_limit_is_refused_before_parsing():
    document = "<a>" + "x" * MAX_OUTPUT_BYTES + "</a>"
    with pytest.raises(ValueError, match="more than the 4194304 we read"):
        parse_xml(document, "qstat -xml")
    with pytest.raises(ValueError, match="more than the 10 we read"):
        parse_xml("<a>ünïcode</a>", "qstat -xml", max_bytes=10)  # counted in UTF-8 bytes


def test_predefined_entities_character_references_and_namespaces_are_read():
    root = parse_xml("<?xml version='1.0'?><job_info xmlns:xsd='http://www.w3.org/2001/XMLSchema'>"
                     "<a>&lt;&amp;&#65;</a><n:b xmlns:n='urn:n' n:c='1'/></job_info>", "x")
    assert root.tag == "job_info"
    assert root.find("a").text == "<&A"
    assert root[1].tag == "{urn:n}b" and root[1].get("{urn:n}c") == "1"


@pytest.mark.parametrize("document", ["", "<a>", "not xml", "<a></b>", "<a/><b/>"])
def test_broken_documents_are_value_errors(document):
    with pytest.raises(ValueError, match="unreadable x output"):
        parse_xml(document, "x")


NOISY = "Welcome to the login node. Quota: 12% used.\nmodule: loaded gcc/12\n"


def test_an_unreadable_answer_says_what_the_login_shell_printed_around_it():
    with pytest.raises(SubmitRejected, match=r"printed no job id.*login shell also printed "
                                             r"'Welcome to the login node"):
        read_output(slurm.parse_submit_output, CommandOutput(0, "\n", "", NOISY))
    status = read_output(sge.parse_status_output, CommandOutput(0, "<oops", "", NOISY), "1")
    assert status.state is JobState.UNKNOWN and "gcc/12" in status.reason
    # Readable output, or a quiet shell: nothing is added.
    assert read_output(slurm.parse_submit_output, CommandOutput(0, "82\n", "", NOISY)) == "82"
    with pytest.raises(SubmitRejected) as raised:
        read_output(slurm.parse_submit_output, CommandOutput(0, "\n", ""))
    assert "login shell" not in str(raised.value)


def test_a_long_banner_is_shortened_in_the_error():
    said = CommandOutput(0, "", "", "B" * 5000 + "\n").around()
    assert 300 < len(said) < 600 and " ... " in said
