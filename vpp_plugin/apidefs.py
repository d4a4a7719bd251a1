"""The VPP binary API definitions cniflow ships, per release family.

VPP assigns message ids at start-up and names each message `name_crc`; a client
must pack exactly the layout behind that CRC. vpp-papi reads the layouts from
.api.json files, and its type registry is process-wide, so the agent writes the
one set that matches the VPP it found (vpp_plugin.probe tells which) and loads
only that. The layouts and CRC history are from VPP's own API files, 19.08.1 to
26.x (see the README): families 19.08.x, 20.01-22.02 and 22.06+, with the
20.01 trap (address_family was a u32 there, under the same CRCs as 20.05).

Enum-typed fields are written as their integer width: the bytes are the same
and vpp-papi never recomputes a CRC. address_family stays an enum because
vpp-papi checks that it exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ALL = {"default": 0xFFFFFFFF}


@dataclass(frozen=True)
class Layout:
    """What differs between releases, beyond the CRCs."""

    v1908: bool  # 19.08.x: raw addresses, separate record flags, u32 enums
    af_u32: bool  # 19.08 and 20.01: vl_api_address_t is 20 bytes

    @classmethod
    def of(cls, version: str) -> Layout:
        return cls(v1908=version.startswith("19.08"), af_u32=version[:5] in ("19.08", "20.01"))


def _types(lay: Layout) -> dict:
    af = "u32" if lay.af_u32 else "u8"
    label = [["u8", "is_uniform"], ["u32", "label"], ["u8", "ttl"], ["u8", "exp"]]
    return {
        "aliases": {
            "ip4_address": {"type": "u8", "length": 4},
            "ip6_address": {"type": "u8", "length": 16},
            "mac_address": {"type": "u8", "length": 6},
            "address_with_prefix": {"type": "vl_api_prefix_t"},
        },
        "enums": [["address_family", ["ADDRESS_IP4", 0], ["ADDRESS_IP6", 1], {"enumtype": af}]],
        "unions": [["address_union", ["vl_api_ip4_address_t", "ip4"],
                    ["vl_api_ip6_address_t", "ip6"]]],
        "types": [
            ["address", ["vl_api_address_family_t", "af"], ["vl_api_address_union_t", "un"]],
            ["prefix", ["vl_api_address_t", "address"], ["u8", "len"]],
            ["ip_neighbor", ["u32", "sw_if_index"], ["u32" if lay.v1908 else "u8", "flags"],
             ["vl_api_mac_address_t", "mac_address"], ["vl_api_address_t", "ip_address"]],
            ["fib_mpls_label", *label],
            ["fib_path_nh", ["vl_api_address_union_t", "address"], ["u32", "via_label"],
             ["u32", "obj_id"], ["u32", "classify_table_index"]],
            ["fib_path", ["u32", "sw_if_index"], ["u32", "table_id"], ["u32", "rpf_id"],
             ["u8", "weight"], ["u8", "preference"], ["u32", "type"], ["u32", "flags"],
             ["u32", "proto"], ["vl_api_fib_path_nh_t", "nh"], ["u8", "n_labels"],
             ["vl_api_fib_mpls_label_t", "label_stack", 16]],
            ["ip_route", ["u32", "table_id"], ["u32", "stats_index"], ["vl_api_prefix_t", "prefix"],
             ["u8", "n_paths"], ["vl_api_fib_path_t", "paths", 0, "n_paths"]],
            ["ip_table", ["u32", "table_id"], ["bool", "is_ip6"], ["string", "name", 64]],
        ],
    }


REQ = [["u16", "_vl_msg_id"], ["u32", "client_index"], ["u32", "context"]]
REP = [["u16", "_vl_msg_id"], ["u32", "context"]]
RETVAL = [["i32", "retval"]]


def _exporter_fields(lay: Layout) -> list:
    addr = ["u8", 16] if lay.v1908 else ["vl_api_address_t"]
    return [[addr[0], "collector_address", *addr[1:]], ["u16", "collector_port"],
            [addr[0], "src_address", *addr[1:]], ["u32", "vrf_id"], ["u32", "path_mtu"],
            ["u32", "template_interval"], ["u8" if lay.v1908 else "bool", "udp_checksum"]]


def _interface_details(lay: Layout) -> list:
    head = [["u32", "sw_if_index"], ["u32", "sup_sw_if_index"]]
    if lay.v1908:  # 19.08.1/19.08.2: 230 bytes
        return head + [
            ["u32", "l2_address_length"], ["u8", "l2_address", 8], ["u8", "admin_up_down"],
            ["u8", "link_up_down"], ["u8", "link_duplex"], ["u32", "link_speed"],
            ["u16", "link_mtu"], ["u32", "mtu", 4], ["u32", "sub_id"], ["u8", "sub_dot1ad"],
            ["u8", "sub_dot1ah"], ["u8", "sub_number_of_tags"], ["u16", "sub_outer_vlan_id"],
            ["u16", "sub_inner_vlan_id"], ["u8", "sub_exact_match"], ["u8", "sub_default"],
            ["u8", "sub_outer_vlan_id_any"], ["u8", "sub_inner_vlan_id_any"],
            ["u32", "vtr_op"], ["u32", "vtr_push_dot1q"], ["u32", "vtr_tag1"],
            ["u32", "vtr_tag2"], ["u16", "outer_tag"], ["u8", "b_dmac", 6], ["u8", "b_smac", 6],
            ["u16", "b_vlanid"], ["u32", "i_sid"], ["string", "interface_name", 64],
            ["string", "tag", 64]]
    return head + [  # 20.01 onwards: 295 bytes
        ["vl_api_mac_address_t", "l2_address"], ["u32", "flags"], ["u32", "type"],
        ["u32", "link_duplex"], ["u32", "link_speed"], ["u16", "link_mtu"], ["u32", "mtu", 4],
        ["u32", "sub_id"], ["u8", "sub_number_of_tags"], ["u16", "sub_outer_vlan_id"],
        ["u16", "sub_inner_vlan_id"], ["u32", "sub_if_flags"], ["u32", "vtr_op"],
        ["u32", "vtr_push_dot1q"], ["u32", "vtr_tag1"], ["u32", "vtr_tag2"],
        ["u16", "outer_tag"], ["vl_api_mac_address_t", "b_dmac"],
        ["vl_api_mac_address_t", "b_smac"], ["u16", "b_vlanid"], ["u32", "i_sid"],
        ["string", "interface_name", 64], ["string", "interface_dev_type", 64],
        ["string", "tag", 64]]


def _messages(lay: Layout) -> dict[str, tuple[list, list[str], str | None]]:
    """name -> (fields after the header, CRCs in release order, reply or None).
    Every CRC listed for a message shares that message's layout for this Layout."""
    v19 = lay.v1908
    flag = ["u8" if v19 else "bool"]
    neighbor_dump = ([["u32", "sw_if_index"], ["u8", "is_ipv6"]] if v19 else
                     [["u32", "sw_if_index", ALL], ["vl_api_address_family_t", "af"]])
    neighbor_details = ([["vl_api_ip_neighbor_t", "neighbor"]] if lay.af_u32 else
                        [["f64", "age"], ["vl_api_ip_neighbor_t", "neighbor"]])
    return {
        "show_version": ([], ["51077d14"], "show_version_reply"),
        "show_version_reply": (RETVAL + [["string", "program", 32], ["string", "version", 32],
                                         ["string", "build_date", 32],
                                         ["string", "build_directory", 256]],
                               ["c919bde1"], None),
        "sw_interface_dump": ([["u32", "sw_if_index", ALL], ["bool", "name_filter_valid"],
                              ["string", "name_filter", 0]], ["aa610c27"], "sw_interface_details"),
        "sw_interface_details": (_interface_details(lay),
                                 ["52a9262e"] if v19 else ["17b69fa2", "6c221fc7"], None),
        "set_ipfix_exporter": (_exporter_fields(lay),
                               ["4ff71dea"] if v19 else ["69284e07", "5530c8a0"],
                               "set_ipfix_exporter_reply"),
        "set_ipfix_exporter_reply": (RETVAL, ["e8d4e804"], None),
        "ipfix_exporter_dump": ([], ["51077d14"], "ipfix_exporter_details"),
        "ipfix_exporter_details": (_exporter_fields(lay),
                                   ["742dddee"] if v19 else ["11e07413", "0dedbfe4"], None),
        "flowprobe_params": (
            ([["u8", "record_l2"], ["u8", "record_l3"], ["u8", "record_l4"]] if v19 else
             [["u8", "record_flags"]]) + [["u32", "active_timer"], ["u32", "passive_timer"]],
            ["574adc1c"] if v19 else ["baa46c09"], "flowprobe_params_reply"),
        "flowprobe_params_reply": (RETVAL, ["e8d4e804"], None),
        "flowprobe_set_params": ([["u8", "record_flags"], ["u32", "active_timer", ALL],
                                  ["u32", "passive_timer", ALL]], ["baa46c09"],
                                 "flowprobe_set_params_reply"),
        "flowprobe_set_params_reply": (RETVAL, ["e8d4e804"], None),
        "flowprobe_get_params": ([], ["51077d14"], "flowprobe_get_params_reply"),
        "flowprobe_get_params_reply": (RETVAL + [["u8", "record_flags"],
                                                 ["u32", "active_timer"],
                                                 ["u32", "passive_timer"]], ["f350d621"], None),
        "flowprobe_tx_interface_add_del": ([flag + ["is_add"], ["u8", "which"],
                                            ["u32", "sw_if_index"]],
                                           ["10c2fbab"] if v19 else ["b782c976"],
                                           "flowprobe_tx_interface_add_del_reply"),
        "flowprobe_tx_interface_add_del_reply": (RETVAL, ["e8d4e804"], None),
        "flowprobe_interface_add_del": ([["bool", "is_add"], ["u8", "which"],
                                         ["u8", "direction"], ["u32", "sw_if_index"]],
                                        ["3420739c"], "flowprobe_interface_add_del_reply"),
        "flowprobe_interface_add_del_reply": (RETVAL, ["e8d4e804"], None),
        "flowprobe_interface_dump": ([["u32", "sw_if_index", ALL]], ["f9e6675e"],
                                     "flowprobe_interface_details"),
        "flowprobe_interface_details": ([["u8", "which"], ["u8", "direction"],
                                         ["u32", "sw_if_index"]], ["427d77e0"], None),
        "ip_neighbor_dump": (neighbor_dump, ["6b7bcd0a"] if v19 else ["cd831298", "d817a484"],
                             "ip_neighbor_details"),
        "ip_neighbor_details": (neighbor_details,
                                ["c1a190ed"] if v19 else
                                ["59121ce9"] if lay.af_u32 else ["870e80b9", "e29d79f0"], None),
        "ip_address_dump": ([["u32", "sw_if_index"], flag + ["is_ipv6"]],
                            ["6b7bcd0a"] if v19 else ["2d033de4"], "ip_address_details"),
        "ip_address_details": ([["u32", "sw_if_index"], ["vl_api_address_with_prefix_t", "prefix"]],
                               ["7002eee7"] if v19 else ["b1199745", "ee29b797"], None),
        "ip_route_lookup": ([["u32", "table_id"], ["u8", "exact"], ["vl_api_prefix_t", "prefix"]],
                            ["e2986185", "710d6471"], "ip_route_lookup_reply"),
        "ip_route_lookup_reply": (RETVAL + [["vl_api_ip_route_t", "route"]],
                                  ["ae99de8e", "5d8febcb"], None),
        "ip_table_dump": ([], ["51077d14"], "ip_table_details"),
        "ip_table_details": ([["u32", "table_id"], ["u8", "is_ip6"], ["u8", "name", 64]]
                             if v19 else [["vl_api_ip_table_t", "table"]],
                             ["4d251961"] if v19 else ["c79fca0f"], None),
    }


DUMPS = {"sw_interface_dump", "ipfix_exporter_dump", "flowprobe_interface_dump",
         "ip_neighbor_dump", "ip_address_dump", "ip_table_dump"}


class CrcMismatch(RuntimeError):
    """VPP knows a message under a CRC whose layout cniflow does not have."""


def family(version: str, table: dict[str, int]) -> str:
    """The release family, named as the README names it."""
    if version.startswith("19.08"):
        return "19.08.x"
    if "flowprobe_interface_add_del_3420739c" in table:
        return "22.06+"
    return "20.01-22.02"


def definitions(version: str, table: dict[str, int]) -> dict:
    """The api.json object for the VPP that sent `table`: for each message, the CRC
    VPP announced when cniflow has that layout; messages VPP lacks are left out."""
    lay = Layout.of(version)
    by_name: dict[str, str] = {}
    for name_crc in table:
        name, _, crc = name_crc.rpartition("_")
        by_name[name] = crc
    messages, services, mismatched = [], {}, []
    for name, (fields, crcs, reply) in _messages(lay).items():
        crc = by_name.get(name)
        if crc is None:
            continue
        if crc not in crcs:
            mismatched.append(f"{name} (VPP {crc}, cniflow knows {'/'.join(crcs)})")
            continue
        head = REQ if reply else REP
        messages.append([name, *head, *fields, {"crc": "0x" + crc}])
        if reply:
            services[name] = {"reply": reply, **({"stream": True} if name in DUMPS else {})}
    if mismatched:
        raise CrcMismatch(f"VPP {version} ({family(version, table)}): unknown CRC for "
                          + ", ".join(mismatched))
    return {"module": "cniflow", "messages": messages, "services": services,
            "options": {"version": "1.0.0"}, "vl_api_version": "0x0", "imports": [],
            "counters": [], "paths": [], "enumflags": [], **_types(lay)}


def write(version: str, table: dict[str, int], directory: Path) -> list[str]:
    """The definitions as files vpp-papi loads: cniflow's, and memclnt as vpp-papi
    bundles it (the handshake; its layout is valid back to 19.08)."""
    from importlib import resources

    directory.mkdir(parents=True, exist_ok=True)
    ours = directory / "cniflow.api.json"
    ours.write_text(json.dumps(definitions(version, table)))
    memclnt = directory / "memclnt.api.json"
    memclnt.write_text(resources.files("vpp_papi.data").joinpath("memclnt.api.json").read_text())
    return [str(memclnt), str(ours)]
