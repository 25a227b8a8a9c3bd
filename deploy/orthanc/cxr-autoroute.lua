-- Orthanc auto-routing of chest radiographs to cxr-triage (tested with Orthanc 1.10).
--
-- When a study has been quiet for "StableAge" seconds, every series that is a chest
-- radiograph and has not been routed yet is sent to the modality named CXR_TRIAGE in
-- "DicomModalities".  A series is a chest radiograph when its Modality is CR or DX and
--   * its BodyPartExamined (series, else first instance) is CHEST or THORAX, or
--   * it has no BodyPartExamined and its protocol, series, study or requested-procedure
--     description names the chest (CHEST, THORAX, CXR, LUNG, ...).
--
-- cxr-triage's results come back to this Orthanc as a Structured Report (Modality SR) and
-- a Secondary Capture heatmap (Modality OT, series "AI HEATMAP ..."), which makes the study
-- stable once more.  Two things stop that from re-sending the originals:
--   * every routed series is marked with the user metadata "CxrTriageRouted" (declared in
--     "UserMetadata" of orthanc.json) holding the number of instances sent; a series is
--     routed again only when more instances arrive;
--   * series that are our own results (SR or Secondary Capture SOP classes, or a UID under
--     the 2.25 root with our series description) are never routed.
-- The same rule can live in a commercial PACS as an auto-routing rule (see deploy/PACS.md).

local TARGET = "CXR_TRIAGE"
local ROUTED = "CxrTriageRouted"
local MODALITIES = { CR = true, DX = true }
local BODY_PARTS = { CHEST = true, THORAX = true }
local CHEST_WORDS = { "CHEST", "THORAX", "THORAC", "CXR", "LUNG", "PULMON", "TORAX", "TORACE" }
-- SOP classes cxr-triage writes: Secondary Capture, and the SR family.
local RESULT_SOP_PREFIXES = { "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88." }
local RESULT_DESCRIPTION = "NOT FOR DIAGNOSTIC USE"

local function upper(value)
  if value == nil then return "" end
  return string.upper(value)
end

local function startsWith(text, prefix)
  return string.sub(text, 1, string.len(prefix)) == prefix
end

local function firstInstanceTags(series)
  local instances = series["Instances"] or {}
  if #instances == 0 then return {} end
  return ParseJson(RestApiGet("/instances/" .. instances[1] .. "/simplified-tags"))
end

local function namesChest(...)
  for _, text in ipairs({ ... }) do
    local t = upper(text)
    for _, word in ipairs(CHEST_WORDS) do
      if string.find(t, word, 1, true) then return true end
    end
  end
  return false
end

-- One of our own results (SR or heatmap SC) coming back: never routed.
function IsCxrTriageResult(series, first)
  local tags = series["MainDicomTags"] or {}
  local modality = upper(tags["Modality"])
  local sopClass = first["SOPClassUID"] or ""
  for _, prefix in ipairs(RESULT_SOP_PREFIXES) do
    if startsWith(sopClass, prefix) then return true end
  end
  return (modality == "SR" or modality == "OT")
    and startsWith(tags["SeriesInstanceUID"] or "", "2.25.")
    and string.find(upper(tags["SeriesDescription"]), RESULT_DESCRIPTION, 1, true) ~= nil
end

function IsChestRadiograph(series, first, studyTags)
  local tags = series["MainDicomTags"] or {}
  if not MODALITIES[upper(tags["Modality"])] then
    return false
  end
  local part = upper(tags["BodyPartExamined"])
  if part == "" then part = upper(first["BodyPartExamined"]) end
  if part ~= "" then
    return BODY_PARTS[part] == true
  end
  return namesChest(tags["ProtocolName"], tags["SeriesDescription"], first["ProtocolName"],
                    first["SeriesDescription"], first["RequestedProcedureDescription"],
                    first["PerformedProcedureStepDescription"], studyTags["StudyDescription"])
end

-- Instances already sent for this series (0 when never routed).
local function routedCount(seriesId)
  local names = ParseJson(RestApiGet("/series/" .. seriesId .. "/metadata"))
  for _, name in ipairs(names) do
    if name == ROUTED then
      return tonumber(RestApiGet("/series/" .. seriesId .. "/metadata/" .. ROUTED)) or 0
    end
  end
  return 0
end

function OnStableStudy(studyId, tags, metadata)
  local study = ParseJson(RestApiGet("/studies/" .. studyId))
  local studyTags = study["MainDicomTags"] or {}
  local series = ParseJson(RestApiGet("/studies/" .. studyId .. "/series"))
  local selected, counts = {}, {}
  local results, done = 0, 0
  for _, s in ipairs(series) do
    local first = firstInstanceTags(s)
    if IsCxrTriageResult(s, first) then
      results = results + 1
    elseif IsChestRadiograph(s, first, studyTags) then
      local count = #(s["Instances"] or {})
      if routedCount(s["ID"]) >= count then
        done = done + 1
      else
        table.insert(selected, s["ID"])
        counts[s["ID"]] = count
      end
    end
  end
  if #selected == 0 then
    print("cxr-triage: nothing to route in study " .. studyId .. " (" .. done ..
          " chest series already routed, " .. results .. " result series)")
    return
  end
  -- DumpJson without keepStrings: Priority stays a JSON integer, which the REST API needs.
  -- Synchronous: a failed send raises here, so the series is not marked and the error
  -- shows in Orthanc's log; re-send it from Orthanc Explorer once cxr-triage is back.
  local job = { Resources = selected, Synchronous = true, Priority = 0 }
  RestApiPost("/modalities/" .. TARGET .. "/store", DumpJson(job))
  for _, id in ipairs(selected) do
    RestApiPut("/series/" .. id .. "/metadata/" .. ROUTED, tostring(counts[id]))
  end
  print("cxr-triage: routing " .. #selected .. " chest series of study " .. studyId ..
        " (" .. done .. " already routed, " .. results .. " result series)")
end
